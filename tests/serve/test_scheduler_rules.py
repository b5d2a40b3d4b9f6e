"""The live scheduler is a thin adapter over `core.serving_rules.ServingRules`: its Steps are,
to the last drop and reason, those of the scheduler as it was before the rules moved to core
(kept below as the reference, verbatim but for names)."""

from __future__ import annotations

from typing import Callable

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from apparate.core.batchers import LATE, Decision, finish_time
from apparate.serve.costs import BatchCosts
from apparate.serve.scheduler import PREDICTED_LATE, BatchingOptions, Scheduler, Step


# ------------------------------------------------------------------ reference: the old scheduler
class OldScheduler:
    def __init__(self, options: BatchingOptions):
        self.options = options
        self.batcher = options.batcher()
        self._pre_shed = options.shed and options.kind != "clockwork"
        self._full_first = options.shed and options.kind == "clockwork"

    def decide(self, now: float, arrivals: np.ndarray, deadlines: np.ndarray, costs: np.ndarray,
               batch_costs: BatchCosts, scale: float = 1.0) -> Step:
        n = deadlines.size
        deadlines_all = deadlines
        exec_ms = batch_costs.exec_ms(costs, scale)
        keep = None
        drops: list[tuple[int, str]] = []
        if self._pre_shed:
            late = finish_time(now, exec_ms(1)) > deadlines
            if late.any():
                drops = [(int(i), LATE) for i in np.flatnonzero(late)]
                keep = np.flatnonzero(~late)
                if keep.size == 0:
                    # (the old scheduler returned here without relabelling, so these drops all
                    # said `late`; now they too are `late` only past their deadline)
                    return _old_truthful(_old_probe(Step(drops=tuple(drops)), n), now, deadlines_all)
                arrivals, deadlines, costs = arrivals[keep], deadlines[keep], costs[keep]
                exec_ms = batch_costs.exec_ms(costs, scale)
        d: Decision = self.batcher.decide(now, arrivals, deadlines, exec_ms)
        if self._full_first and d.start:
            d = _old_fuller(now, deadlines, exec_ms, d, self.options.max_batch)
        inner = [(int(i) if keep is None else int(keep[i]), d.reason or "dropped") for i in d.drop]
        step = _old_probe(Step(start=d.start, drops=tuple(sorted(drops + inner)), wake_at=d.wake_at), n)
        return _old_truthful(step, now, deadlines_all)


def _old_probe(step: Step, n: int) -> Step:
    if step.start or not n or len(step.drops) < n or any(why != LATE for _, why in step.drops):
        return step
    return Step(start=1, drops=step.drops[:-1])


def _old_truthful(step: Step, now: float, deadlines: np.ndarray) -> Step:
    if not any(why == LATE for _, why in step.drops):
        return step
    drops = tuple((i, PREDICTED_LATE if why == LATE and deadlines[i] > now else why) for i, why in step.drops)
    return Step(start=step.start, drops=drops, wake_at=step.wake_at)


def _old_on_time(t: float, deadlines: np.ndarray, exec_ms: Callable[[int], float], mb: int) -> int:
    count, i, n = 0, 0, deadlines.size
    full = exec_ms(mb) * 1e-3
    while i < n:
        while i < n and deadlines[i] < t + exec_ms(1) * 1e-3:
            i += 1
        if i >= n:
            break
        b = min(mb, n - i)
        end = t + (full if b == mb else exec_ms(b) * 1e-3)
        count += int(np.count_nonzero(deadlines[i:i + b] >= end))
        t, i = end, i + b
    return count


def _old_fuller(now: float, deadlines: np.ndarray, exec_ms: Callable[[int], float], d: Decision, mb: int) -> Decision:
    dl = np.delete(np.asarray(deadlines, dtype=np.float64), list(d.drop)) if d.drop else np.asarray(deadlines)
    n = dl.size
    if d.start >= min(mb, n) or n <= mb:
        return d
    end_full = now + exec_ms(mb) * 1e-3
    tight = dl < end_full
    rest = dl[~tight]
    if not tight.any() or rest.size < mb:
        return d
    keep_cw = d.start + _old_on_time(now + exec_ms(d.start) * 1e-3, dl[d.start:], exec_ms, mb)
    drop_full = mb + _old_on_time(end_full, rest[mb:], exec_ms, mb)
    if drop_full <= keep_cw:
        return d
    kept = np.delete(np.arange(np.asarray(deadlines).size), list(d.drop)) if d.drop else np.arange(n)
    extra = tuple(int(i) for i in kept[tight])
    return Decision(start=mb, drop=tuple(sorted(set(d.drop) | set(extra))), reason=LATE)


# ------------------------------------------------------------------------------------- the check
@st.composite
def live_queues(draw, backlog: bool = False):
    """A live decision's inputs: a queue (oldest first) whose deadlines straddle `now` and the
    predicted batch ends, per-request token counts, and a batch-time table (text or images).
    `backlog`: more queued than a batch holds, on an SLO of a few full batches (where the
    full-batch rule has something to decide)."""
    mb = draw(st.integers(2 if backlog else 1, 16))
    n = draw(st.integers(mb + 1, 3 * mb + 4) if backlog else st.integers(0, 3 * mb + 4))
    lengths = draw(st.integers(1, 6))
    base = draw(st.floats(0.5, 20.0))
    per = draw(st.floats(0.0, 5.0))
    bumps = np.asarray(draw(st.lists(st.floats(0.0, 4.0), min_size=lengths * mb, max_size=lengths * mb)))
    # roughly growing in size and length, with a measured profile's bumps
    table = (base + per * np.arange(1, mb + 1)[None, :] * np.arange(1, lengths + 1)[:, None]
             + bumps.reshape(lengths, mb))
    now = draw(st.floats(0.0, 5.0))
    full_s = float(table[0, -1]) * 1e-3
    span = 2 * full_s if backlog else 0.3
    ages = sorted(draw(st.lists(st.floats(0.0, span), min_size=n, max_size=n)), reverse=True)
    arrivals = now - np.asarray(ages, dtype=np.float64)
    slo = draw(st.floats(1.0, 4.0)) * full_s if backlog else draw(st.floats(0.001, 0.2))
    extra = np.asarray(draw(st.lists(st.floats(0.0, 0.1), min_size=n, max_size=n)), dtype=np.float64)
    deadlines = arrivals + slo + (extra if draw(st.booleans()) and not backlog else 0.0)
    costs = np.asarray(draw(st.lists(st.integers(1, lengths + 1), min_size=n, max_size=n)), dtype=np.int64)
    bc = BatchCosts((), table, draw(st.floats(0.0, 2.0)))
    scale = draw(st.sampled_from([1.0, 0.8, 1.7]))
    return mb, now, arrivals, deadlines, costs, bc, scale


@settings(max_examples=600, deadline=None)
@given(q=live_queues(), kind=st.sampled_from(["clockwork", "tfserving"]), shed=st.booleans(),
       timeout_ms=st.sampled_from([0.0, 2.0, 30.0]), enqueued=st.integers(1, 4))
def test_the_adapter_decides_exactly_as_the_old_scheduler(q, kind, shed, timeout_ms, enqueued):
    mb, now, arrivals, deadlines, costs, bc, scale = q
    opts = BatchingOptions(kind, mb, shed, batch_timeout_ms=timeout_ms, max_enqueued_batches=enqueued)
    new = Scheduler(opts).decide(now, arrivals, deadlines, costs, bc, scale)
    old = OldScheduler(opts).decide(now, arrivals, deadlines, costs, bc, scale)
    assert new == old
    assert all(type(i) is int for i, _ in new.drops)  # the engine indexes its snapshot with them


@settings(max_examples=400, deadline=None)
@given(q=live_queues(backlog=True))
def test_the_adapter_runs_full_batches_exactly_as_the_old_scheduler(q):
    mb, now, arrivals, deadlines, costs, bc, scale = q
    opts = BatchingOptions("clockwork", mb, True)
    new = Scheduler(opts).decide(now, arrivals, deadlines, costs, bc, scale)
    assert new == OldScheduler(opts).decide(now, arrivals, deadlines, costs, bc, scale)
