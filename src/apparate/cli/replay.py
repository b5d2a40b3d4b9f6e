"""`apparate replay BUNDLE --recording FILE --policy NAME`: one policy on a recorded stream.

The bundle gives the latency profile and the bootstrap data; the recording (from `apparate
record` with the same bundle) gives every ramp's outputs on the stream being replayed. Your own
logs in two commands:

    apparate record BUNDLE --stream csv:texts.csv --out texts.npz
    apparate replay BUNDLE --recording texts.npz --trace file:arrivals.csv
"""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    from apparate.bench.experiment_args import add_replay_args

    p = sub.add_parser("replay", help="replay one policy on a recorded stream with an arrival trace",
                       description=__doc__)
    p.add_argument("bundle", help="bundle directory the recording was made with")
    p.add_argument("--recording", required=True, help="recording file from `apparate record`")
    p.add_argument("--policy", default="apparate", help="vanilla, static, apparate, branchynet, ... (default apparate)")
    add_replay_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", help="data directory (default: $APPARATE_DATA, else ../shared/data)")
    p.add_argument("--out", help="directory for report.md, metrics.json and plots")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from apparate.core.recording import Recording
    from apparate.model.bundle import load_bundle
    from apparate.policies.catalog import RampFamily, family_of
    from apparate.bench.experiment import run_experiment
    from apparate.bench.record import check_recording_matches
    from apparate.bench.report import comparison_table, write_report

    from apparate.bench.experiment_args import command_line

    bundle = load_bundle(args.bundle, load_model=False)
    rec = Recording.load(args.recording)
    check_recording_matches(rec, args.bundle)
    spec = spec_from_args(args, bundle)
    families = {"light": RampFamily(bundle.recording, rec, bundle.profile)}
    if family_of(args.policy) == "heads":
        if rec.features is None:
            raise ValueError(f"{args.policy} needs a recording with the ramps' features: apparate record ... --features")
        families["heads"] = RampFamily(bundle.recording, rec, bundle.profile)
    result = run_experiment(spec, families=families)
    settings = result.settings
    print(comparison_table(result.metrics))
    if args.out:
        path = write_report(args.out, result.metrics, result.runs, result.info, command_line(),
                            settings.accuracy_constraint)
        print(f"report: {path}")
    else:
        print(json.dumps(result.metrics[0].to_dict(), indent=1))
    return 0


def spec_from_args(args: argparse.Namespace, bundle):
    """The experiment the flags ask for on `bundle`: its workload's kind of settings
    (`Settings.for_kind`, as `apparate serve` uses) with the flags' changes."""
    from apparate.bench.experiment import ExperimentSpec
    from apparate.bench.experiment_args import rate_from_args, settings_changes

    return ExperimentSpec(workload=bundle.manifest.get("workload", "?"), data_dir=args.data_dir, kind=bundle.kind,
                          seed=args.seed, trace=args.trace, rate=rate_from_args(args), cv=args.cv, slo_ms=args.slo_ms,
                          slo_x=args.slo_x, batching=args.batching, max_batch=args.max_batch,
                          settings=settings_changes(args),
                          policies=(args.policy,), progress=False)
