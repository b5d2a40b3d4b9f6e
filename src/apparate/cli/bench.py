"""`apparate bench NAME`: benchmarks and experiments, each printing a table of side-by-side ratios.

Each benchmark is a module listed in BENCHES with `register(subparsers)`, like the commands.
"""

from __future__ import annotations

import argparse
import importlib

BENCHES = (
    "apparate.bench.tuning",
    "apparate.bench.compare",
    "apparate.bench.sweep",
    "apparate.bench.simspeed",
    "apparate.bench.engine",
    "apparate.bench.ramps",
    "apparate.bench.calibration",
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark or experiment (see `apparate bench -h`)")
    bsub = p.add_subparsers(dest="bench", metavar="NAME")
    for name in BENCHES:
        importlib.import_module(name).register(bsub)
    p.set_defaults(func=lambda args: p.print_help() or 0)
