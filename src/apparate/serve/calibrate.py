"""Ramp costs as they are paid on this machine, timed through the executor at start.

Preparation times a ramp alone on a cached activation, which misses most of what serving pays
for it (on ResNet-56, 0.03 ms profiled against 0.2-0.5 ms paid per ramp); placement and the ramp
budget would then admit ramps that cost ten times their share. So before ramps are placed, every
ramp is timed inside the model, with scoring, the hook and the release callback, as the
executor runs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from apparate.core.controller import Config
from apparate.core.evidence import F, Scorer

from .requests import Request

if TYPE_CHECKING:
    from .executor import Executor


ALONE_UP_TO = 4
"""Up to this batch size calibration times each ramp alone: a server under light load serves
batches of one to a few inputs with one or two ramps active, where a ramp's cost on the caches
its backbone stage evicted decides the ramp budget. Interpolating batch 2 between batch 1 (alone)
and the max batch (all ramps at once, warm caches) under-charged it: on the vehicle ResNet-56 at
100/s a learned server still removed 16 ramps over the budget in 90 s; with batch 4 timed alone
(and the ramp loop's budget cooldown) 6."""


def calibration_sizes(profile: Any, max_batch: int) -> list[int]:
    """The profiled batch sizes nearest 1, `ALONE_UP_TO` (if below the max batch) and the max
    batch: where calibration times the ramps (the sizes between take their costs from these,
    `fill_between`)."""
    grid = [int(b) for b in profile.batch_sizes]
    wants = (1, min(ALONE_UP_TO, max_batch), max_batch)
    return sorted({min(grid, key=lambda g: abs(g - want)) for want in wants})


def fill_between(profile: Any, calibrated: Any, sizes: Sequence[int]) -> Any:
    """`calibrated` (the profile after timing the ramps at `sizes`) with every other profiled batch
    size's ramp costs taken from the timed ones: between two timed sizes, interpolated along the
    batch size; above the largest, the prepared cost scaled as the largest timed size's was. A
    profile update moves only the cells it measured, so these sizes kept the bundle's prepared
    costs (a head alone on a cached activation): on the vehicle ResNet-56 at 100/s (batches of
    about two) a server placed ramps that fit on those costs, measured them over the budget,
    removed them and placed others, some 90 times in 90 s."""
    from apparate.core.profile import LatencyProfile

    grid = np.asarray(profile.batch_sizes, dtype=np.float64)
    timed = sorted(int(np.argmin(np.abs(grid - b))) for b in sizes)
    ramp = np.array(calibrated.ramp_ms, dtype=np.float64)
    before = np.asarray(profile.ramp_ms, dtype=np.float64)
    for k in range(grid.size):
        if k in timed:
            continue
        lo = max((t for t in timed if t < k), default=None)
        hi = min((t for t in timed if t > k), default=None)
        if lo is not None and hi is not None:
            w = (grid[k] - grid[lo]) / (grid[hi] - grid[lo])
            ramp[:, k] = (1 - w) * ramp[:, lo] + w * ramp[:, hi]
        elif lo is not None:  # above every timed size: the prepared shape, at the timed level
            scale = np.divide(ramp[:, lo], before[:, lo], out=np.ones_like(ramp[:, lo]), where=before[:, lo] > 0)
            ramp[:, k] = before[:, k] * scale
    return LatencyProfile(calibrated.batch_sizes, calibrated.site_ms, ramp, calibrated.vanilla_ms,
                          calibrated.lengths, calibrated.site_names, calibrated.device)


def timed_runs(executor: Executor, items: list[Any], cfg: Config, repeats: int, scorer: Scorer | None = None) -> list[Any]:
    """The reports of `repeats` runs of one batch of `items` through `executor` with `cfg`, as the
    engine runs a batch, after one more run that warms up (its report dropped)."""
    import torch

    reports = []
    for _ in range(repeats + 1):
        with torch.inference_mode():
            rep = executor.run([Request(it, 1, 0.0, 0.0) for it in items], cfg, executor.clock(), scorer)
        if rep is not None:
            reports.append(rep)
    return reports[1:]


def calibrate_ramps(executor: Executor, profile: Any, sizes: Sequence[int], repeats: int = 3,
                    learned: bool = False) -> Any:
    """The profile with every ramp's cost as it is paid here: the ramp plus scoring, the hook
    and the release callback, timed inside the model at each size (and profiled length), the
    other profiled sizes filled from them (`fill_between`).
    Backbone times are left as profiled; online measurements refine everything while serving.
    `learned`: as the learned exit rule pays them (pooled features, features and scores)."""
    before = profile
    ee, codec = executor.ee, executor.served.codec
    S = ee.num_sites
    sites = tuple(range(S))
    # The learned rule scores a ramp inside the model only where it can release (threshold > 0):
    # a fitted scorer whose score is always 0.5 and a threshold that 0.5 never meets time that
    # work (features, movement, score) without releasing anything.
    scorer = Scorer(-1, np.zeros((S, F))) if learned else None
    cfg = Config(sites, ((1e-9,) if learned else (0.0,)) * S)
    lengths = [None] if executor.served.kind != "text" else [int(x) for x in profile.lengths]

    def timed(items: list[Any], run: Config) -> dict[int, float]:
        costs = [rep.ramp_ms for rep in timed_runs(executor, items, run, repeats, scorer)]
        return {s: float(np.median([c[s] for c in costs])) for s in run.sites if costs and all(s in c for c in costs)}

    for length in lengths:
        for b in sizes:
            items = codec.example(b, length) if length else codec.example(b)
            if b <= ALONE_UP_TO:
                # One ramp per pass: a ramp right after its backbone stage runs on caches the
                # stage evicted, and pays several times what it pays after another ramp (video,
                # learned: 0.25 ms alone against 0.09 among all sixteen). At small batches that
                # fixed cost is the budget's whole question, so each ramp is timed as it runs alone.
                ramp = {}
                for site in sites:
                    ramp.update(timed(items, Config((site,), cfg.thresholds[:1])))
            else:
                ramp = timed(items, cfg)
            if ramp:
                profile = profile.updated(b, {}, ramp, None, None if length is None else float(length), 1.0)
    executor.reset_stream()  # the examples are no part of the stream
    return fill_between(before, profile, sizes)
