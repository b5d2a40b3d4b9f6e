"""`apparate bench calibration WORKLOAD`: how much tuned thresholds lose on the inputs that come
next, against what they lose on the window they were tuned on, per calibration setting.

On a real recording (the workload's bundle and stream, as `bench compare` prepares and records
them), with the ramps the bootstrap placement chooses: windows of `--window` inputs slide by
`--step`; thresholds are tuned on each window (`core.tuning.tune`, batch-1 latencies) with each
setting given, and applied to the `--ahead` inputs after it. Printed per setting: the mean loss
(share of released answers that differ from the original model's) in sample and ahead, the
90th percentile ahead, and the latency win ahead. The ratio of the two losses is why
`margin_z` is large (docs/core.md).
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from apparate.bench.experiment_args import add_experiment_args

    p = sub.add_parser("calibration", help="loss of tuned thresholds on the next inputs vs in sample, per setting",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_experiment_args(p)
    p.add_argument("--window", type=int, default=1024, help="inputs per tuning window (default 1024)")
    p.add_argument("--ahead", type=int, default=256, help="inputs after the window to evaluate on (default 256)")
    p.add_argument("--step", type=int, default=128, help="slide between windows (default 128)")
    p.add_argument("--variants", default="margin_z=1,margin_z=2,margin_z=3,agreement=raw;margin_z=0",
                   help="comma-separated settings to compare, each NAME=VALUE[;NAME=VALUE] (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from apparate.bench.timing import markdown_table
    from apparate.bench.experiment_args import command_line, parse_overrides, spec_from_args
    from apparate.core.exits import simulate
    from apparate.core.placement import initial_placement
    from apparate.core.tuning import tune
    from apparate.bench.experiment import bundle_and_recording

    spec = spec_from_args(args)
    log = print if spec.progress else (lambda _s: None)
    bundle, stream, rec = bundle_and_recording(spec, log)
    length = None if rec.lengths is None else float(np.mean(rec.lengths))
    base = spec.settings_for(bundle.kind)
    place = initial_placement(bundle.recording.conf, bundle.recording.agree, bundle.profile, base, (1.0, length))
    sites = list(place.sites)
    if not sites:
        print("the bootstrap placement chose no ramp at this budget: nothing to tune (raise --ramp-budget)")
        return 1
    table = bundle.profile.table(1, sites, length)
    conf, agree = rec.conf[:, sites].astype(np.float64), rec.agree[:, sites]
    W, H = args.window, args.ahead
    starts = range(0, conf.shape[0] - W - H + 1, args.step)
    if not starts:
        raise ValueError(f"the stream has {conf.shape[0]} inputs: fewer than --window + --ahead")
    rows = []
    for variant in args.variants.split(","):
        settings = base.replace(**parse_overrides([x for x in variant.split(";") if x]))
        ins, ahead, wins = [], [], []
        for s0 in starts:
            w, nxt = slice(s0, s0 + W), slice(s0 + W, s0 + W + H)
            res = tune(conf[w], agree[w], table, settings)
            ev = simulate(conf[nxt], agree[nxt], res.thresholds, table)
            ins.append(1 - res.result.accuracy)
            ahead.append(1 - ev.accuracy)
            wins.append(ev.win)
        rows.append((variant.replace(";", " "), f"{np.mean(ins):.2%}", f"{np.mean(ahead):.2%}",
                     f"{np.percentile(ahead, 90):.2%}", f"{np.mean(ahead) / max(np.mean(ins), 1e-9):.1f}x",
                     f"{np.mean(wins):.3f}"))
    print(f"# Calibration: {spec.workload}, stream {stream}, ramps {sites}, windows of {W} slid by {args.step} "
          f"({len(starts)}), {H} inputs ahead, constraint {base.accuracy_constraint:.1%}\n")
    print(markdown_table(["setting", "loss in sample", f"loss on the next {H}", "(90th pct)", "ahead / in sample",
                          "win ahead"], rows))
    print(f"\nreproduce: {command_line()}")
    return 0
