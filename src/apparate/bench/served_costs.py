"""Costs as a server pays them here, for a replay (`bench compare --ramp-costs served`,
`--profile here`).

A bundle's profile times each ramp's head alone on a cached activation. A server pays more: the
hook, the scoring, and for the learned exit rule its features and score (on images also the
pooled features and their movement), on the caches its backbone stage just evicted. A server
measures that at start (`serve/calibrate.py`) and judges its ramp budget on it; a replay that
charges the bundle's costs lets a policy run ramps a server at the same budget could not. This
module builds the server's executor for a bundle and returns the bundle's profile with the ramp
costs that calibration measures on this machine, for the hook a policy runs.

`--profile here` goes further: the whole profile as this machine runs it now, the backbone
included. A bundle's backbone times are those of the moment it was prepared; on the vehicle
ResNet-56 a batch-1 pass measured 10.7 ms then and 7.0-7.7 ms in a later session, so the same
arrival rate loaded the replayed model more than the served one (more queueing, where early
answers pay): a replay on the bundle's profile gave 0.858 of vanilla's median at 57/s, one on
the profile re-timed here 1.018, as a live server measured (docs/results.md).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

from apparate.core.profile import LatencyProfile
from apparate.core.settings import Settings

HOOKS = ("plain", "learned")
_TIMED: dict[tuple, LatencyProfile] = {}  # what this process timed already: one measurement per command


def _once(key: tuple, measure: Callable[[], LatencyProfile]) -> LatencyProfile:
    """`measure()` the first time `key` is asked for in this process, the same profile after:
    `bench capacity` and `bench spread` replay many times, and each replay must charge the same
    costs (re-timed per replay, the SLO and every rate's costs moved with the host's noise)."""
    if key not in _TIMED:
        _TIMED[key] = measure()
    return _TIMED[key]


def hook_of(policy: str) -> str:
    """The hook a replayed policy runs when served: the learned exit rule's, or the plain one."""
    return "learned" if policy == "apparate-learned" else "plain"


@contextmanager
def _server_executor(bundle: Any, threads: int | None, movement: bool = True) -> Iterator[Any]:
    """A server's executor for `bundle` (its hooks removed from the model afterwards)."""
    import torch

    from apparate.serve.executor import Executor
    from apparate.serve.model_io import ServedModel

    if threads is not None:
        torch.set_num_threads(threads)
    served = ServedModel.from_bundle(bundle)
    ex = Executor(served, lambda pairs: None, movement=movement)
    try:
        yield ex
    finally:
        ex.close()
        served.ee.remove_hooks()


def served_ramp_costs(bundle: Any, hook: str, max_batch: int, settings: Settings,
                      threads: int | None = None) -> LatencyProfile:
    """`bundle`'s profile with every ramp's cost as a server calibrates it here for `hook`
    ('plain' or 'learned', the latter with `settings.evidence_movement`), as a server's start-up
    calibration times them (`calibration_sizes`, `fill_between`). Backbone times are the bundle's."""
    from apparate.serve.calibrate import calibrate_ramps, calibration_sizes

    if hook not in HOOKS:
        raise ValueError(f"hook must be one of {HOOKS}, got {hook!r}")

    def measure() -> LatencyProfile:
        with _server_executor(bundle, threads, settings.evidence_movement) as ex:
            prof = ex.served.profile
            return calibrate_ramps(ex, prof, calibration_sizes(prof, max_batch), learned=hook == "learned")

    prof = bundle.profile  # the bundle's own, or the one `--profile here` re-timed: each its own costs
    return _once(("ramps", str(bundle.path), float(prof.vanilla(1)), float(prof.ramp_ms.sum()), hook, max_batch,
                  settings.evidence_movement, threads), measure)


def profile_here(bundle: Any, max_batch: int, threads: int | None = None, repeats: int = 5,
                 log: Any = None) -> LatencyProfile:
    """`bundle`'s profile re-timed on this machine as a server's executor runs the model: the
    bare backbone at every profiled batch size (and text length), the median of `repeats` passes
    after one to warm up, its sites scaled with it; then every ramp as `served_ramp_costs` times
    it for the plain hook. Timed once per process (`_once`'s reason), at the first call."""
    import numpy as np

    from apparate.core.controller import Config
    from apparate.serve.calibrate import calibrate_ramps, calibration_sizes, timed_runs

    def measure() -> LatencyProfile:
        with _server_executor(bundle, threads) as ex:
            codec, prof = ex.served.codec, ex.served.profile
            lengths = [None] if ex.served.kind != "text" else [int(x) for x in prof.lengths]
            for length in lengths:
                for b in (int(x) for x in prof.batch_sizes):
                    items = codec.example(b, length) if length else codec.example(b)
                    times = [rep.vanilla_ms for rep in timed_runs(ex, items, Config(), repeats) if rep.vanilla_ms]
                    if times:
                        prof = prof.updated(b, {}, {}, float(np.median(times)), None if length is None else float(length), 1.0)
            ex.reset_stream()
            prof = calibrate_ramps(ex, prof, calibration_sizes(prof, max_batch))
        if log is not None:
            log(f"profile re-timed here: a batch-1 pass {prof.vanilla(1):.2f} ms (the bundle's "
                f"{bundle.profile.vanilla(1):.2f}), a ramp {prof.at(1)[1].mean():.3f} ms ({bundle.profile.at(1)[1].mean():.3f})")
        return prof

    return _once(("here", str(bundle.path), max_batch, threads, repeats), measure)
