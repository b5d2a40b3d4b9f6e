"""`apparate bench capacity WORKLOAD`: each policy's capacity in replay, the highest offered rate
at which it still answers in time, side by side, with goodput against offered load.

A rate passes for a policy when the 99th percentile of its served requests' latency is within the
SLO and it sheds at most `--max-drop` of them; with `--within-checks`, when it also keeps the
accuracy constraint over the stream and every window of 500 at `--min-worst-window` (a policy
that answers in time by answering wrongly does not pass: early stop at SST-2's capacity kept
98.37-98.53%, below a 1% constraint). The rates tried: from `--rate` (or 10/s) doubled
until vanilla fails, then `--steps` rates spaced geometrically up to that, then, per policy,
doublings while it still passes at the highest rate tried, and `--refine` bisections between its
last passing and first failing rate. Every rate replays all
the policies on the same recording and arrival trace (the trace is rescaled; the SLO stays the
experiment's). Writes `capacity.md`, `capacity.json` (a list of {policy, capacity_rps, accuracy,
worst_window_accuracy} at each policy's capacity, and every rate tried with its goodput, p99,
requests shed, accuracy, worst window and verdict) and `goodput.png`.

The capacity criterion is a knife edge: near capacity one burst that overflows the SLO turns a
pass into a fail. `--draws K` repeats the whole search on K draws of the arrivals (a synthetic
trace drawn with seeds 0..K-1, a real one rotated to a seeded start, as `bench spread` does) and
adds each policy's median capacity, its range and its median ratio to vanilla's on the same draw;
the first table and the plot are the first draw's.

Apparate as the paper builds it releases answers early but runs every input to the end, so its
capacity is vanilla's less what its active ramps cost; `apparate-stop` lets inputs released while
work waits leave their batch (a sampled share runs on for feedback), so its exits also save
compute (`replay.early_stop`).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

POLICIES = ("vanilla", "apparate", "apparate-stop")


def register(sub: argparse._SubParsersAction) -> None:
    from apparate.bench.experiment_args import add_experiment_args

    p = sub.add_parser("capacity", help="each policy's capacity in replay (highest rate within the SLO), goodput curves",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_experiment_args(p)
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated (default %(default)s)")
    p.add_argument("--steps", type=int, default=6, help="geometric rates up to vanilla's first failing one (default 6)")
    p.add_argument("--refine", type=int, default=3, help="bisections per policy around its capacity (default 3)")
    p.add_argument("--max-drop", type=float, default=0.01, help="share of requests a passing rate may shed (default 0.01)")
    p.add_argument("--within-checks", action="store_true",
                   help="a passing rate must also keep the accuracy constraint over the whole stream and every "
                        "window of 500 at --min-worst-window: the capacity at the user's accuracy, not only in time")
    p.add_argument("--min-worst-window", type=float,
                   help="with --within-checks: the lowest accuracy any window of 500 may have "
                        "(default 1 - 1.5 x the accuracy constraint: 98.5%% at 1%%)")
    p.add_argument("--draws", type=int, default=1, help="repeat the search on this many draws of the arrivals (default 1)")
    p.add_argument("--out", help="directory for capacity.md, capacity.json and goodput.png "
                                 "(default runs/capacity-WORKLOAD)")
    p.set_defaults(func=run)


def passes(m: Any, slo_ms: float, max_drop: float, checks: tuple[float, float] | None = None) -> bool:
    """Within the SLO at this rate: p99 of the served within it, and few enough shed; with
    `checks` (lowest accuracy, lowest worst window) within them too."""
    in_time = m.p99_ms <= slo_ms and m.dropped <= max_drop * m.requests
    if checks is None or not in_time:
        return in_time
    return m.accuracy >= checks[0] - 1e-12 and m.worst_window_accuracy >= checks[1] - 1e-12


def accuracy_checks(args: argparse.Namespace) -> tuple[float, float] | None:
    """(lowest accuracy, lowest worst window) a passing rate must keep, or None (`--within-checks` off)."""
    if not args.within_checks:
        if args.min_worst_window is not None:
            raise ValueError("--min-worst-window needs --within-checks")
        return None
    from apparate.bench.experiment_args import settings_changes

    c = float(settings_changes(args)["accuracy_constraint"])  # the flag's, or `--set`'s over it
    worst = 1.0 - 1.5 * c if args.min_worst_window is None else args.min_worst_window
    if not 0 <= worst <= 1:
        raise ValueError(f"--min-worst-window must be in [0, 1], got {worst}")
    return 1.0 - c, worst


def capacity_of(tried: dict[float, bool]) -> float | None:
    """The highest rate that passed below the lowest that failed (None: none passed)."""
    fails = [r for r, ok in tried.items() if not ok]
    ceiling = min(fails) if fails else float("inf")
    ok = [r for r, good in tried.items() if good and r < ceiling]
    return max(ok) if ok else None


def search(spec: Any, names: tuple[str, ...], args: argparse.Namespace, progress: bool,
           checks: tuple[float, float] | None = None) -> tuple[dict[float, dict[str, Any]], float]:
    """Every rate tried for one draw of the arrivals: {rate: {policy: Metrics}}, and the SLO."""
    import numpy as np

    from apparate.bench.experiment import by_policy, run_experiment

    results: dict[float, dict[str, Any]] = {}
    slo = float("nan")

    def ok(m: Any) -> bool:
        return passes(m, slo, args.max_drop, checks)

    def at(rate: float) -> dict[str, Any]:
        nonlocal slo
        rate = float(round(rate, 3))
        if rate not in results:
            res = run_experiment(replace(spec, rate=rate))
            slo = float(res.info["slo_ms"])
            results[rate] = by_policy(res)
            if progress:
                m = results[rate]
                print(f"  {rate:9.2f}/s  " + "  ".join(f"{n} p99 {m[n].p99_ms:.1f} ms ({'ok' if ok(m[n]) else 'over'})"
                                                      for n in names))
        return results[rate]

    def verdicts(name: str) -> dict[float, bool]:
        return {r: ok(m[name]) for r, m in results.items()}

    lo = float(spec.rate or 10.0)
    while ok(at(lo)["vanilla"]) and lo < 1e6:
        lo *= 2
    hi = lo
    lo = min(results)
    if not ok(results[lo]["vanilla"]):
        raise ValueError(f"vanilla misses the SLO of {slo:.1f} ms already at {lo:g} requests/s: start lower with --rate")
    for r in np.geomspace(lo, hi, max(args.steps, 2)):
        at(r)
    for name in names:
        # a policy that still passes at the highest rate tried (early stop can outrun vanilla):
        # keep doubling until it fails
        while ok(results[max(results)][name]) and max(results) < 1e6:
            at(2 * max(results))
        for _ in range(args.refine):
            v = verdicts(name)
            cap = capacity_of(v)
            above = [r for r in v if r > (cap or 0) and not v[r]]
            if cap is None or not above:
                break
            at((cap + min(above)) / 2)
    return results, slo


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import numpy as np

    from apparate.bench.experiment_args import command_line, spec_from_args
    from apparate.bench.timing import markdown_table

    names = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    if "vanilla" not in names:
        names = ("vanilla",) + names
    base = spec_from_args(args, names)
    if args.draws < 1:
        raise ValueError("--draws must be >= 1")
    checks = accuracy_checks(args)  # bad flags fail before any replay
    from apparate.bench.spread import has_randomness

    k = args.draws if has_randomness(base.trace, base.stream, base.fps) else 1
    if k < args.draws:
        print(f"the trace ({base.trace}) has no randomness: one draw")
    draws = [search(replace(base, progress=False, trace_seed=d if k > 1 else None), names, args, base.progress, checks)
             for d in range(k)]
    results, slo = draws[0]

    def verdicts(name: str, res: dict[float, dict[str, Any]] = results) -> dict[float, bool]:
        return {r: passes(m[name], slo, args.max_drop, checks) for r, m in res.items()}

    rows, dump = [], []
    van_cap = capacity_of(verdicts("vanilla"))
    for name in names:
        cap = capacity_of(verdicts(name))
        m = results[cap][name] if cap is not None else None
        dump.append({"policy": name, "capacity_rps": cap, "accuracy": None if m is None else m.accuracy,
                     "worst_window_accuracy": None if m is None else m.worst_window_accuracy,
                     "completed": None if m is None else m.completed})
        rows.append((name, "-" if cap is None else f"{cap:.2f}",
                     "-" if cap is None or not van_cap else f"{cap / van_cap:.3f}",
                     "-" if m is None else f"{m.p99_ms:.1f}", "-" if m is None else f"{m.accuracy:.2%}",
                     "-" if m is None else f"{m.worst_window_accuracy:.2%}", "-" if m is None else f"{m.mean_batch:.1f}",
                     "-" if m is None else f"{m.completed:.0%}"))
    table = markdown_table(["policy", "capacity /s", "vs vanilla", "p99 ms at it", "accuracy", "worst window",
                            "mean batch", "ran to the end"], rows)
    within = "" if checks is None else f", accuracy >= {checks[0]:.2%} and every window >= {checks[1]:.2%}"
    print(f"\n# Capacity in replay: {base.workload}, SLO {slo:.1f} ms, p99 within it and <= {args.max_drop:.0%} shed{within}\n")
    print(table)
    spread = ""
    if len(draws) > 1:
        srows, per_draw = [], []
        for name in names:
            caps = [capacity_of(verdicts(name, res)) for res, _ in draws]
            vans = [capacity_of(verdicts("vanilla", res)) for res, _ in draws]
            worst = [res[c][name].worst_window_accuracy for (res, _), c in zip(draws, caps) if c is not None]
            ok = [c for c in caps if c is not None]
            ratios = [c / v for c, v in zip(caps, vans) if c is not None and v]
            per_draw.append({"policy": name, "capacity_rps": caps, "vanilla_rps": vans, "worst_window_accuracy": worst})
            srows.append((name, f"{np.median(ok):.2f}" if ok else "-", f"{min(ok):.2f}-{max(ok):.2f}" if ok else "-",
                          f"{np.median(ratios):.3f}" if ratios else "-",
                          f"{min(ratios):.3f}-{max(ratios):.3f}" if ratios else "-",
                          f"{min(worst):.2%}" if worst else "-"))
        spread = markdown_table(["policy", "capacity /s (median)", "range", "vs vanilla (median, same draw)", "range",
                                 "worst window (lowest)"], srows)
        print(f"\n## Over {len(draws)} draws of the arrivals\n")
        print(spread)
        dump = [{**d, "draws": p} for d, p in zip(dump, per_draw)]
    out = Path(args.out or f"runs/capacity-{base.workload}")
    out.mkdir(parents=True, exist_ok=True)
    # every rate tried, with what decides a pass: where the checks fail shows here
    rates = {n: [{"offered": r, "goodput": m.goodput, "p99_ms": m.p99_ms, "dropped": m.dropped,
                  "accuracy": m.accuracy, "worst_window_accuracy": m.worst_window_accuracy,
                  "passes": passes(m, slo, args.max_drop, checks)}
                 for r in sorted(results) for m in [results[r][n]]] for n in names}
    criterion = None if checks is None else {"min_accuracy": checks[0], "min_worst_window": checks[1]}
    (out / "capacity.json").write_text(json.dumps(
        {"capacity": dump, "slo_ms": slo, "max_drop": args.max_drop, "checks": criterion, "rates": rates}, indent=1))
    (out / "capacity.md").write_text(f"# Capacity in replay\n\n```\n{command_line()}\n```\n\n{table}\n"
                                     + (f"\n## Over {len(draws)} draws of the arrivals\n\n{spread}\n" if spread else ""))
    _plot(out / "goodput.png", rates, {d["policy"]: d["capacity_rps"] for d in dump})
    print(f"\nwritten to {out}/; reproduce: {command_line()}")
    return 0


def _plot(path: Any, rates: dict[str, list[dict[str, Any]]], caps: dict[str, float | None]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    top = max(x["offered"] for c in rates.values() for x in c)
    ax.plot([0, top], [0, top], color="0.7", lw=1, ls="--", label="offered")
    for name, c in rates.items():
        line, = ax.plot([x["offered"] for x in c], [x["goodput"] for x in c], marker="o", ms=3, label=name)
        if caps.get(name):
            ax.axvline(caps[name], color=line.get_color(), lw=1, alpha=0.5)
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("goodput (answered within the SLO, /s)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
