"""`apparate bench sweep WORKLOAD --param slo|budget|accuracy --values ...`: how Apparate's win
over vanilla (and its share of the oracle's) moves with the SLO, the ramp budget or the
accuracy constraint. Each value replays vanilla, apparate and optimal on the same recording."""

from __future__ import annotations

import argparse

PARAMS = {"slo": "SLO as a multiple of batch-1 latency", "budget": "ramp budget", "accuracy": "accuracy constraint"}


def register(sub: argparse._SubParsersAction) -> None:
    from apparate.bench.experiment_args import add_experiment_args

    p = sub.add_parser("sweep", help="sweep the SLO, ramp budget or accuracy constraint", description=__doc__)
    add_experiment_args(p)
    p.add_argument("--param", required=True, choices=sorted(PARAMS))
    p.add_argument("--values", required=True, help="comma-separated values, e.g. 1,2,4 or 0.005,0.01,0.02")
    p.add_argument("--out", help="directory for sweep.md, sweep.json and sweep.png (default runs/sweep-WORKLOAD-PARAM)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from dataclasses import replace
    from pathlib import Path

    from apparate.bench.timing import markdown_table
    from apparate.bench.experiment_args import command_line, spec_from_args
    from apparate.bench.experiment import by_policy, run_experiment, with_settings

    values = [float(v) for v in args.values.split(",")]
    base = spec_from_args(args, ("vanilla", "apparate", "optimal"))
    rows, dump = [], []
    for v in values:
        if args.param == "slo":
            spec = replace(base, slo_x=v, slo_ms=None)
        elif args.param == "budget":
            spec = with_settings(base, ramp_budget=v)
        else:
            spec = with_settings(base, accuracy_constraint=v)
        res = run_experiment(spec)
        m = by_policy(res)
        van, app, opt = m["vanilla"], m["apparate"], m["optimal"]
        share = (van.p50_ms - app.p50_ms) / (van.p50_ms - opt.p50_ms) if van.p50_ms > opt.p50_ms else float("nan")
        rows.append((v, f"{van.p50_ms:.2f}", f"{app.p50_ms:.2f}", f"{1 - app.p50_ms / van.p50_ms:+.1%}",
                     f"{app.p95_ms / van.p95_ms:.3f}", f"{share:.2f}", f"{app.accuracy:.2%}",
                     f"{app.active_share:.0%}", app.dropped, van.dropped))
        dump.append({"value": v, "vanilla": van.to_dict(), "apparate": app.to_dict(), "optimal": opt.to_dict()})
    head = [args.param, "vanilla p50", "apparate p50", "p50 win", "p95 ratio", "share of optimal", "accuracy",
            "ramps active", "drops (app)", "drops (van)"]
    table = markdown_table(head, rows)
    print()
    print(table)
    out = Path(args.out or f"runs/sweep-{args.workload}-{args.param}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.md").write_text(f"# Sweep of {PARAMS[args.param]}\n\n```\n{command_line()}\n```\n\n{table}\n")
    (out / "sweep.json").write_text(json.dumps(dump, indent=1))
    _plot(out / "sweep.png", args.param, values, dump)
    print(f"\nwritten to {out}/; reproduce: {command_line()}")
    return 0


def _plot(path, param, values, dump) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("vanilla", "apparate", "optimal"):
        ax.plot(values, [d[name]["p50_ms"] for d in dump], marker="o", label=name)
    ax.set_xlabel(PARAMS[param])
    ax.set_ylabel("median latency (ms)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
