"""Flags shared by the commands that replay policies (bench compare, bench sweep, demo)."""

from __future__ import annotations

import argparse
import shlex
import sys


def add_experiment_args(p: argparse.ArgumentParser, workload_default: str | None = None) -> None:
    if workload_default is None:
        p.add_argument("workload", help="zoo workload (`apparate prepare --list`)")
    else:
        p.add_argument("--workload", default=workload_default, help=f"zoo workload (default {workload_default})")
    p.add_argument("--data-dir", help="data directory (default: $APPARATE_DATA, else ../shared/data)")
    p.add_argument("--bundle", help="use this prepared bundle (default: prepare once into the cache)")
    p.add_argument("--deebert-bundle", help="bundle with DeeBERT-style ramps for the deebert policies")
    p.add_argument("--stream", help="stream to replay (default: camera-day for images, drift for text), or your own: "
                                    "video:PATH (footage: a video file, or a folder of them in name order), "
                                    "images:PATH (a folder of class subfolders, a flat folder, or a CSV manifest "
                                    "path[,label]), csv:PATH (a CSV/TSV of texts, optionally labelled)")
    p.add_argument("--fps", type=float, help="a camera's fixed-rate trace at this many frames per second (sets --trace "
                                             "fixed --rate FPS); video:PATH streams default to their own frame times")
    p.add_argument("--n", type=int, help="inputs to replay (default: the whole stream)")
    p.add_argument("--seed", type=int, default=0)
    add_replay_args(p)
    p.add_argument("--bootstrap", type=int, help="bootstrap inputs when preparing a bundle")
    p.add_argument("--stream-bootstrap", type=float, default=0.0, metavar="SHARE",
                   help="place Apparate's ramps on this first share of the stream (the paper's bootstrap, e.g. 0.1), "
                        "which is then not replayed; default: the bundle's held-out bootstrap inputs")
    p.add_argument("--threads", type=int, help="torch threads when preparing and recording")
    p.add_argument("--ramp-costs", choices=("prepared", "served"), default="prepared",
                   help="what a ramp costs the replayed inputs: the bundle's profile (prepared: each head timed "
                        "alone) or what a server calibrates on this machine for the hook each policy runs "
                        "(served: the learned exit rule's features and score included; docs/replay.md)")
    p.add_argument("--profile", choices=("prepared", "here"), default="prepared", dest="profile_costs",
                   help="the latency profile every policy replays on: the bundle's, measured when it was prepared, "
                        "or re-timed here first (here: the backbone at every profiled batch size and the ramps as a "
                        "server pays them, so the replay predicts a server on this machine; docs/replay.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or per-policy lines")


def add_replay_args(p: argparse.ArgumentParser) -> None:
    """The replay's own flags (arrivals, SLO, batching, the controller's constraint, budget and
    `--set`), the same in `apparate replay` and the commands that replay every policy."""
    from apparate.core.serving_rules import BATCHINGS
    from apparate.core.settings import Settings
    from apparate.zoo import trace_specs

    defaults = Settings()
    p.add_argument("--trace", default="fixed", help=trace_specs.HELP + " (default fixed: a camera)")
    p.add_argument("--rate", type=float, help="mean requests per second (default 30 for synthetic traces; a real "
                                              "trace is rescaled to it when given)")
    p.add_argument("--cv", type=float, default=2.0, help="coefficient of variation for --trace gamma")
    p.add_argument("--slo-ms", type=float,
                   help="latency SLO (default: --slo-x times the batch-1 model latency, at the 90th-percentile text length)")
    p.add_argument("--slo-x", type=float, default=4.0, help="SLO as a multiple of batch-1 latency (default 4)")
    p.add_argument("--batching", default="clockwork", choices=BATCHINGS,
                   help="the replay's batcher; +serve adds the live server's rules (shedding, full batches, "
                        "probe; docs/replay.md) (default clockwork)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--accuracy-constraint", type=float, default=defaults.accuracy_constraint,
                   help="max loss vs the original (default %(default)s)")
    p.add_argument("--ramp-budget", type=float, default=defaults.ramp_budget,
                   help="max share ramps may add to a non-exiting input's latency, at the batch size served "
                        "(default %(default)s)")
    add_set_arg(p)


def add_set_arg(p: argparse.ArgumentParser) -> None:
    """`--set NAME=VALUE`, the same in every command that runs a controller (replays and serve)."""
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="overrides",
                   help="override a controller setting (any field of apparate.core.settings.Settings, "
                        "see docs/core.md; the others are the workload kind's, the same in replay and serve), "
                        "e.g. --set agreement=raw; repeatable")


def settings_changes(args: argparse.Namespace) -> dict[str, object]:
    """The flags' changes to the workload kind's settings (`--accuracy-constraint`,
    `--ramp-budget`, `--set`), checked against every kind's (ValueError/TypeError if bad)."""
    from apparate.core.settings import KIND_DEFAULTS, Settings

    changes = {"accuracy_constraint": args.accuracy_constraint, "ramp_budget": args.ramp_budget,
               **parse_overrides(getattr(args, "overrides", []))}
    for kind in KIND_DEFAULTS:
        Settings.for_kind(kind, **changes)
    return changes


def spec_from_args(args: argparse.Namespace, policies=None):
    from apparate.bench.experiment import ExperimentSpec

    # The changes the flags make to the settings; the run applies them to its workload's kind
    # (`Settings.for_kind`, as `apparate serve` does) once the bundle says which. Checked here.
    changes = settings_changes(args)
    rate = rate_from_args(args)
    return ExperimentSpec(
        workload=args.workload, data_dir=args.data_dir, bundle=args.bundle, deebert_bundle=args.deebert_bundle,
        stream=args.stream, n=args.n, seed=args.seed, trace="fixed" if args.fps else args.trace,
        rate=rate, fps=args.fps, cv=args.cv,
        slo_ms=args.slo_ms, slo_x=args.slo_x, batching=args.batching, max_batch=args.max_batch,
        settings=changes, policies=policies, bootstrap=args.bootstrap, stream_bootstrap=args.stream_bootstrap,
        threads=args.threads, ramp_costs=getattr(args, "ramp_costs", "prepared"),
        profile=getattr(args, "profile_costs", "prepared"),
        progress=not args.no_progress)


def rate_from_args(args: argparse.Namespace) -> float | None:
    """--fps, else --rate, else 30/s for a synthetic trace and the trace's own rate for a real one."""
    from apparate.zoo import trace_specs

    trace_specs.parse(args.trace)  # a malformed --trace fails before any work
    if getattr(args, "fps", None):
        return args.fps
    if args.rate is not None:
        return args.rate
    return None if trace_specs.is_real(args.trace) else trace_specs.DEFAULT_RATE


def parse_overrides(items: list[str]) -> dict[str, object]:
    """NAME=VALUE pairs; values are JSON (numbers, true/false, null) or else plain strings."""
    import json

    out: dict[str, object] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--set takes NAME=VALUE, got {item!r}")
        try:
            out[name.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[name.strip()] = value
    return out


def command_line() -> str:
    return "apparate " + " ".join(shlex.quote(a) for a in sys.argv[1:])
