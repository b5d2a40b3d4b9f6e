"""`apparate bench spread WORKLOAD`: how much one replay's figures can be trusted, and which
variant of the settings is better across many draws of the arrivals.

A replay is deterministic, but a policy's median latency hangs on a few early decisions (which
ramp is probed when, where a batch boundary falls), so one trace can rank two rules that differ by
less than that path noise either way. This command replays the chosen policies under each
variant of the settings (`--variant LABEL:NAME=VALUE,...`, repeatable; the default settings are
the variant `default`) on `--draws` draws of the arrivals (a synthetic trace drawn with seeds
0..K-1; a real one rotated to start at a seeded point), and reports per policy and variant the
median and range of the p50 ratio to vanilla, the share of the oracle's win, how often it beats a
reference policy on the same draw, and the accuracy figures. Video streams replayed at their own
frame times (and fixed-rate traces) have no randomness: one draw.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    from apparate.bench.experiment_args import add_experiment_args

    p = sub.add_parser("spread", help="figures over many draws of the arrivals, per settings variant",
                       description=__doc__)
    add_experiment_args(p)
    p.add_argument("--policies", default="apparate,branchynet+opt",
                   help="comma-separated policies (vanilla and optimal are always added; default %(default)s)")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL:NAME=VALUE[,NAME=VALUE]",
                   help="a variant of the settings (applied over --set); repeatable; the defaults are always "
                        "run as `default`")
    p.add_argument("--draws", type=int, default=8, help="draws of the arrivals (default %(default)s)")
    p.add_argument("--reference", default="branchynet+opt",
                   help="the policy each one is compared with, draw by draw (default %(default)s)")
    p.add_argument("--out", help="directory for spread.md, spread.json and spread.png "
                                 "(default runs/spread-WORKLOAD)")
    p.set_defaults(func=run)


def parse_variants(items: list[str]) -> dict[str, dict[str, Any]]:
    """LABEL:NAME=VALUE,... -> {label: changes}; `default` (no changes) first."""
    from apparate.bench.experiment_args import parse_overrides

    out: dict[str, dict[str, Any]] = {"default": {}}
    for item in items:
        label, sep, body = item.partition(":")
        if not sep or not label.strip() or not body.strip():
            raise ValueError(f"--variant takes LABEL:NAME=VALUE[,NAME=VALUE], got {item!r}")
        if label.strip() in out:
            raise ValueError(f"variant {label.strip()!r} given twice")
        out[label.strip()] = parse_overrides([kv for kv in body.split(",") if kv.strip()])
    return out


def uses_settings(policy: str) -> bool:
    """Whether a policy's decisions depend on the controller settings a variant changes (the
    baselines and oracles are tuned by their own rules)."""
    return policy.startswith("apparate") or policy == "static"


def has_randomness(trace: str, stream: str | None, fps: float | None) -> bool:
    from apparate.zoo.video import is_video_stream

    # a fixed-rate trace, a camera's --fps, or footage replayed at its own frame times
    return not (trace == "fixed" or fps or is_video_stream(stream))


def run(args: argparse.Namespace) -> int:
    import json
    from dataclasses import replace
    from pathlib import Path

    import numpy as np

    from apparate.bench.experiment import by_policy, run_experiment, with_settings
    from apparate.bench.experiment_args import command_line, spec_from_args
    from apparate.bench.timing import markdown_table
    from apparate.core.settings import KIND_DEFAULTS, Settings

    if args.draws < 1:
        raise SystemExit("--draws must be >= 1")
    variants = parse_variants(args.variant)
    asked = [p.strip() for p in args.policies.split(",") if p.strip()]
    policies = tuple(dict.fromkeys(["vanilla", *asked, args.reference, "optimal"]))
    base = spec_from_args(args, policies)
    base_progress = base.progress
    base = replace(base, progress=False)
    for changes in variants.values():  # a bad name or value fails before any replay
        for kind in KIND_DEFAULTS:
            Settings.for_kind(kind, **{**base.settings, **changes})
    draws = args.draws if has_randomness(base.trace, base.stream, base.fps) else 1
    if draws < args.draws:
        print(f"the trace ({base.trace}{', frame times' if base.stream else ''}) has no randomness: one draw")
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    info: dict[str, Any] = {}
    from tqdm.auto import tqdm

    with tqdm(total=draws * len(variants), desc="replays", unit="replay", disable=None if base_progress else True) as pb:
        for d in range(draws):  # variants interleaved within a draw: each sees the same arrivals
            for label, changes in variants.items():
                spec = replace(with_settings(base, **changes), trace_seed=d if draws > 1 else None)
                res = run_experiment(spec, log=lambda _: None)
                info = res.info
                m = by_policy(res)
                van, orc, ref = m["vanilla"], m["optimal"], m[args.reference]
                for name in policies:
                    x = m[name]
                    win = van.p50_ms - orc.p50_ms
                    results.setdefault((name, label), []).append({
                        "p50_ratio": x.p50_ms / van.p50_ms,
                        "share": (van.p50_ms - x.p50_ms) / win if win > 0 else float("nan"),
                        "beats_reference": float(x.p50_ms < ref.p50_ms),
                        "accuracy": x.accuracy, "worst_window": x.worst_window_accuracy,
                        "early": 1.0 - x.final_rate})
                pb.update(1)
    rows, dump = [], []
    for (name, label), runs in results.items():
        if not uses_settings(name) and label != "default":
            continue  # the same in every variant
        col = {k: np.array([r[k] for r in runs]) for k in runs[0]}
        p = col["p50_ratio"]
        rows.append((name, label, f"{np.median(p):.3f}", f"{p.min():.3f}-{p.max():.3f}",
                     f"{np.nanmedian(col['share']):.2f}",
                     "-" if name in (args.reference, "vanilla", "optimal") else f"{int(col['beats_reference'].sum())}/{len(runs)}",
                     f"{np.median(col['accuracy']):.2%}", f"{col['accuracy'].min():.2%}",
                     f"{col['worst_window'].min():.1%}", f"{np.median(col['early']):.1%}"))
        dump.append({"policy": name, "variant": label, "changes": variants[label], "runs": runs})
    head = ["policy", "variant", "p50 ratio (median)", "range", "share of optimal", f"beats {args.reference}",
            "accuracy (median)", "lowest", "worst window (lowest)", "released early"]
    table = markdown_table(head, rows)
    print()
    print(table)
    out = Path(args.out or f"runs/spread-{args.workload}")
    out.mkdir(parents=True, exist_ok=True)
    note = (f"{draws} draw(s) of the arrivals ({info.get('trace', base.trace)}); "
            f"variants: {', '.join(f'{k} {v or {}}' for k, v in variants.items())}")
    (out / "spread.md").write_text(f"# Spread over draws of the arrivals\n\n```\n{command_line()}\n```\n\n"
                                   f"{note}\n\n{table}\n")
    (out / "spread.json").write_text(json.dumps({"info": info, "draws": draws, "results": dump}, indent=1))
    _plot(out / "spread.png", dump, args.workload)
    print(f"\n{note}\nwritten to {out}/; reproduce: {command_line()}")
    return 0


def _plot(path, dump: list[dict], workload: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(dump)), 4))
    labels = []
    for i, d in enumerate(dump):
        y = [r["p50_ratio"] for r in d["runs"]]
        ax.scatter([i] * len(y), y, alpha=0.6, s=18)
        ax.plot([i - 0.3, i + 0.3], [sorted(y)[len(y) // 2]] * 2, color="black", lw=1.5)
        labels.append(d["policy"] if d["variant"] == "default" else f"{d['policy']}\n{d['variant']}")
    ax.set_xticks(range(len(dump)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("p50 / vanilla's (each dot a draw)")
    ax.set_title(f"{workload}: median latency over draws of the arrivals")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
