"""Latency profiler: what the backbone costs up to each site and what each ramp costs, on this
machine, per batch size (and per sequence-length bucket for text). Produces the core's
`LatencyProfile`.

Cumulative site times come from forward hooks that only read the clock (negligible cost) during
a run of the backbone, as shares of that run, scaled to the bare total timed separately without
any hook. A ramp's cost is
measured as serving pays it: the backbone runs through the EarlyExitModel with every ramp
active, hooks attached beforehand as the server keeps them, and a release callback that does
what the server's does with no answer to hand over. The run's extra time over a bare pass
beside it is what the ramps cost together; each site's time inside its hook says how that
splits (`apportion`). Every number is the median
over `repeats` rounds after `warmup` rounds, each round visiting every shape once, with
`torch.set_num_threads(threads)` in force.

On a CUDA device (`device`) the same measurements are taken with events (`model.timers`): a
forward returns once its kernels are queued, so the host clock would time launches. Each pass
is timed between two events and read after a synchronisation, site ends are events recorded in
the site hooks, and a ramp's in-hook time runs from an event recorded before its ramp (a hook
placed ahead of the EarlyExitModel's) to one recorded in its release callback. The warm-up
rounds also take CUDA's one-off costs (kernel selection, the caching allocator's first blocks).
The profile records the device it was measured on.

Medians of noisy runs can break physical order by a hair (a bigger batch looking faster, a
later site looking earlier), and the control loops assume costs that grow with depth and batch
size; so the profile is made monotone along both axes (running maximum), which changes only
entries that noise had put out of order.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from apparate.core.profile import LatencyProfile
from apparate.devices import to_device
from apparate.model.early_exit import EarlyExitModel
from apparate.model.timers import HostTimer, device_label, timer_for
from apparate.model.sites import ModelInput, Site, call_model, primary_output

MakeBatch = Callable[[int, int | None], ModelInput]  # (batch size, length or None) -> inputs


def powers_of_two(max_batch: int) -> list[int]:
    if max_batch < 1:
        raise ValueError(f"max batch size must be at least 1, got {max_batch}")
    out, b = [], 1
    while b <= max_batch:
        out.append(b)
        b *= 2
    if out[-1] != max_batch:
        out.append(max_batch)
    return out


@contextmanager
def num_threads(threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def profile_latency(
    backbone: nn.Module,
    sites: Sequence[Site],
    ramps: Sequence[nn.Module],
    make_batch: MakeBatch,
    batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
    lengths: Sequence[int] | None = None,
    warmup: int = 2,
    repeats: int = 7,
    threads: int | None = None,
    progress: bool = True,
    device: Any = None,
) -> LatencyProfile:
    """Measure a `LatencyProfile` (ms) of `backbone` with `ramps` at `sites`, on `device` (default:
    where the backbone's weights are; the backbone and ramps must be there already, the batches
    `make_batch` gives are moved there)."""
    from tqdm.auto import tqdm

    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    if len(sites) != len(ramps):
        raise ValueError(f"{len(sites)} sites but {len(ramps)} ramps")
    bs = sorted({int(b) for b in batch_sizes})
    lens: list[int | None] = sorted({int(x) for x in lengths}) if lengths else [None]
    S = len(sites)
    site_ms = np.zeros((len(lens), len(bs), S))
    ramp_ms = np.zeros((len(lens), len(bs), S))
    van_ms = np.zeros((len(lens), len(bs)))
    modules = dict(backbone.named_modules())
    backbone.eval()
    if device is None:
        from apparate.devices import device_of

        device = device_of(backbone)
    clock = timer_for(device)
    shapes = [(li, bi, length, b) for li, length in enumerate(lens) for bi, b in enumerate(bs)]
    inputs = {(li, bi): to_device(make_batch(b, length), device) for li, bi, length, b in shapes}
    van_runs: dict[tuple[int, int], list[float]] = {k: [] for k in inputs}
    site_runs: dict[tuple[int, int], list[np.ndarray]] = {k: [] for k in inputs}
    inside_runs: dict[tuple[int, int], list[np.ndarray]] = {k: [] for k in inputs}
    paid_runs: dict[tuple[int, int], list[float]] = {k: [] for k in inputs}
    # Hooks are attached only during its own calls, so the bare and site-timed runs stay hook-free.
    ee = EarlyExitModel(backbone, sites, ramps) if S else None
    with num_threads(threads), torch.no_grad():
        bar = tqdm(total=warmup + repeats, desc="profiling latency", disable=None if progress else True, unit="round")
        # Rounds interleave the shapes: a burst of load from elsewhere on the machine then hits
        # one round of many shapes, which the median drops, instead of every repeat of one
        # shape, which no statistic could repair.
        for rnd in range(warmup + repeats):
            for li, bi, length, b in shapes:
                x = inputs[(li, bi)]
                van = _once_ms(lambda: call_model(backbone, x), clock=clock)
                stamps = _site_times(backbone, modules, sites, x, clock)
                # the ramps' total is a small difference of two noisy passes: pair it more often
                # where a pass is short (each pair: bare, then with every ramp)
                pairs = [(van, served_ramp_ms(ee, x, clock))] if ee is not None else []
                for _ in range(PAIRS_BELOW_BATCH // b if ee is not None else 0):
                    bare = _once_ms(lambda: call_model(backbone, x), clock=clock)
                    pairs.append((bare, served_ramp_ms(ee, x, clock)))
                if rnd >= warmup:
                    van_runs[(li, bi)].append(van)
                    site_runs[(li, bi)].append(stamps)
                    for bare, (inside, total) in pairs:
                        inside_runs[(li, bi)].append(inside)
                        paid_runs[(li, bi)].append(total - bare)
            bar.update(1)
        bar.close()
    for (li, bi) in inputs:
        van_ms[li, bi] = float(np.median(van_runs[(li, bi)]))
        site_ms[li, bi] = np.median(np.stack(site_runs[(li, bi)]), axis=0) * van_ms[li, bi]
        if S:
            ramp_ms[li, bi] = apportion(np.median(np.stack(inside_runs[(li, bi)]), axis=0),
                                        float(np.median(paid_runs[(li, bi)])))
    # Monotone in depth, capped by the whole model, and monotone in batch size and length.
    site_ms = np.minimum(np.maximum.accumulate(site_ms, axis=2), van_ms[..., None])
    for axis in (1, 0):
        van_ms = np.maximum.accumulate(van_ms, axis=axis)
        site_ms = np.maximum.accumulate(site_ms, axis=axis)
        ramp_ms = np.maximum.accumulate(ramp_ms, axis=axis)
    return LatencyProfile(
        batch_sizes=np.asarray(bs), site_ms=site_ms, ramp_ms=ramp_ms, vanilla_ms=van_ms,
        lengths=np.asarray([1] if lens == [None] else lens), site_names=tuple(s.name for s in sites),
        device=device_label(device))


# Extra (bare, served) pairs per round for batches below this size, whose passes are short.
PAIRS_BELOW_BATCH = 4
# Bounds on the served run's extra time over the sum of the in-hook times (see `apportion`).
PAID_SHARE = (0.1, 3.0)


def served_ramp_ms(ee: EarlyExitModel, x: ModelInput, clock: Any = None) -> tuple[np.ndarray, float]:
    """One run with every ramp active, as a server runs it: hooks attached beforehand (as a server
    keeps them between batches) and a release callback that tests each ramp's answers against a
    threshold. Returns each site's in-hook time (its module's end to the end of the callback, ms)
    and the whole run's time (ms)."""
    if clock is not None and not isinstance(clock, HostTimer):
        return _served_ramp_ms_device(ee, x, clock)
    S = ee.num_sites
    start = np.zeros(S)
    end = np.zeros(S)
    n = _batch_len(x)
    pending = np.ones(n, dtype=bool)

    def on_ramp(r: Any) -> None:  # what serve.executor does for a ramp that may release, when none fires
        if n == 1:
            _ = pending[0] and 1.0 - float(r.conf[0]) < 1e-12
        else:
            np.flatnonzero(pending & ((1.0 - r.conf) < 1e-12))
        end[r.site] = time.perf_counter()

    before = ee.active
    ee.set_active(range(S))
    try:
        total = _once_ms(lambda: ee(x, on_ramp=on_ramp, stamps=start))
    finally:
        ee.set_active(before)
    return np.maximum(end - start, 0.0) * 1e3, total


def _served_ramp_ms_device(ee: EarlyExitModel, x: ModelInput, clock: Any) -> tuple[np.ndarray, float]:
    """`served_ramp_ms` on a device: each ramp timed between events, one recorded by a hook that
    runs ahead of the EarlyExitModel's (before the ramp) and one in the callback (after it; what
    the server's callback does there, launching the copy of the answers, is not part of it)."""
    S = ee.num_sites
    start: list[Any] = [None] * S
    end: list[Any] = [None] * S

    def make_hook(i: int) -> Callable:
        def hook(_m: nn.Module, _i: Any, _o: Any) -> None:
            start[i] = clock.mark()
        return hook

    def on_ramp(r: Any) -> None:
        end[r.site] = clock.mark()

    handles = [m.register_forward_hook(make_hook(i), prepend=True) for i, m in enumerate(ee.site_modules)]
    before = ee.active
    ee.set_active(range(S))
    try:
        total = _once_ms(lambda: ee(x, on_ramp=on_ramp), clock=clock)
    finally:
        ee.set_active(before)
        for h in handles:
            h.remove()
    inside = np.array([clock.ms(a, b) if a is not None and b is not None else 0.0 for a, b in zip(start, end)])
    return np.maximum(inside, 0.0), total


def apportion(inside: np.ndarray, paid: float) -> np.ndarray:
    """Each site's cost (ms) from its in-hook time and what the served run cost over the bare one.

    In-hook times overstate a ramp's cost where the backbone's own caches are cold (after a large
    layer, the hook pays misses the next layer would have paid; measured on MiniLM at batch 1: 100
    us in the hook, 13 us added to the pass), and miss what happens outside the hook (dispatch).
    The run's extra time is the truth in total, the in-hook times say how it splits; the ratio is
    bounded (`PAID_SHARE`) so that a noisy difference of two passes cannot make ramps free."""
    total = float(inside.sum())
    if total <= 0:
        return np.full(inside.shape, max(paid, 0.0) / max(inside.size, 1))
    lo, hi = PAID_SHARE
    return inside * min(max(paid / total, lo), hi)


def _batch_len(x: ModelInput) -> int:
    t = x if torch.is_tensor(x) else next(v for v in x.values() if torch.is_tensor(v))
    return int(t.shape[0])


def _once_ms(fn: Callable[[], Any], inner: int = 1, clock: Any = None) -> float:
    """Time of one call (the median of `inner` back-to-back calls, for very short ones); on a
    device, from the device's idle (a sync before) to its work done (events, a sync after)."""
    clock = clock or _HOST
    times = []
    for _ in range(inner):
        clock.sync()
        t = clock.mark()
        fn()
        e = clock.mark()
        clock.sync()
        times.append(clock.ms(t, e))
    return float(np.median(times))


_HOST = HostTimer()


def _site_times(backbone: nn.Module, modules: dict[str, nn.Module], sites: Sequence[Site],
                x: ModelInput, clock: Any = None) -> np.ndarray:
    """How far through the forward each site ends: the share of the pass (clock hooks on the
    sites; the pass's own total as the reference, so that hook costs and noise between this pass
    and a separate bare one cannot squash the deepest sites against the bare total)."""
    clock = clock or _HOST
    stamps: list[Any] = [None] * len(sites)

    def make_hook(i: int) -> Callable:
        def hook(_m: nn.Module, _i: Any, _o: Any) -> None:
            stamps[i] = clock.mark()
        return hook

    handles = [modules[s.name].register_forward_hook(make_hook(s.index)) for s in sites]
    try:
        clock.sync()
        t0 = clock.mark()
        call_model(backbone, x)
        t1 = clock.mark()
        clock.sync()
    finally:
        for h in handles:
            h.remove()
    total = max(clock.ms(t0, t1), 1e-9)
    at = np.array([clock.ms(t0, s) / total if s is not None else 0.0 for s in stamps])
    return np.clip(at, 0.0, 1.0)
