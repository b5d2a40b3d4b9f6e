"""`apparate bench compare WORKLOAD`: every policy on the same recording and trace (the paper's
Table 2 analogue), with ratios against vanilla and the oracle, plots and a JSON dump."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from apparate.bench.experiment_args import add_experiment_args

    p = sub.add_parser("compare", help="all policies side by side on one recording and trace", description=__doc__)
    add_experiment_args(p)
    p.add_argument("--policies", help="comma-separated policies (default: all that apply)")
    p.add_argument("--out", help="report directory (default runs/compare-WORKLOAD)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from apparate.bench.experiment_args import command_line, spec_from_args
    from apparate.bench.experiment import run_experiment
    from apparate.bench.report import comparison_table, write_report

    policies = tuple(p.strip() for p in args.policies.split(",")) if args.policies else None
    spec = spec_from_args(args, policies)
    result = run_experiment(spec)
    print()
    print(comparison_table(result.metrics))
    out = args.out or f"runs/compare-{args.workload}"
    path = write_report(out, result.metrics, result.runs, result.info, command_line(),
                        result.settings.accuracy_constraint, result.phases)
    print(f"\n{', '.join(f'{k}={v}' for k, v in result.info.items())}")
    print(f"report, plots and metrics: {path.parent}/")
    print(f"reproduce: {command_line()}")
    return 0
