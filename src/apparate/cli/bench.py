"""`apparate bench NAME`: benchmarks and experiments, each printing a table of side-by-side ratios.

Each benchmark is a module of `apparate.bench` with `register(subparsers)`, like the commands.
"""

from __future__ import annotations

import argparse

from apparate.bench import (capacity, cluster, compare, engine_overhead, evidence, generate, gpu, out_of_sample, overload, ramp_cost,
                            search_speed, simspeed, spread, sweep)

BENCHES = (search_speed, compare, sweep, spread, capacity, simspeed, engine_overhead, ramp_cost, out_of_sample, evidence, overload, cluster,
           generate, gpu)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark or experiment (see `apparate bench -h`)")
    bsub = p.add_subparsers(dest="bench", metavar="NAME")
    for module in BENCHES:
        module.register(bsub)
    p.set_defaults(func=lambda args: p.print_help() or 0)
