"""The scheduler: the replay batchers' decisions applied to the live queue.

The same `ClockworkBatcher` / `TFServingBatcher` objects the simulator uses decide here, on a
snapshot of the queue (oldest first) with the batch time predicted from the live profile for
the active ramps. The engine thread calls `decide` only while its worker is idle (it is the
worker), so `start` is always applicable; drops are applied at once.

Load shedding. Clockwork judges deadlines itself (`drop_late`). TF Serving does not know
deadlines, so with shedding on the scheduler removes, before asking it, every queued request
that could not finish by its deadline even in a batch of one: the same rule Clockwork applies.
With shedding off, late requests are served late and counted as such.

Full batches under a backlog. Clockwork runs the largest batch that meets the deadline of every
one of the b oldest requests. When the oldest are close to their deadlines (a batch ran longer
than predicted) that batch is small, so the server's throughput drops just when it is needed
most, the requests behind it come closer to their deadlines in turn, and the next batch is
small too: measured on a ResNet-20 server at about its capacity, batches averaged 10 inputs of
16 and half the requests were dropped late. So when Clockwork's batch is held below the max
batch by the oldest requests and more are waiting, the scheduler compares, on the predicted
batch times, how many of the queued requests meet their deadlines (a) with Clockwork's batch
and (b) dropping the oldest requests that cannot meet theirs in a full batch and running one;
it drops them only when that serves more requests in time. Each option's count serves the rest
of the queue in full batches in arrival order, the way admission predicted it would.

Reasons, as a client reads them: `late` means the request really waited past its deadline
before it could start; `predicted late` means it was dropped earlier, at batch time, because the
predicted batch times say it cannot finish by its deadline (Clockwork's drop, which keeps a
backlog from making every request behind it late too).

An idle worker never drops everything: when every queued request is predicted late, the newest
is served anyway (late, if the prediction holds). Predictions come from recent batches; after a
slow spell they would otherwise refuse every request for ever, since no batch would run to
show that the spell is over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from apparate.core.batchers import LATE, Batcher, ClockworkBatcher, Decision, TFServingBatcher, finish_time

from .costs import BatchCosts

PREDICTED_LATE = "predicted late"  # dropped at batch time before its deadline passed (see above)


@dataclass(frozen=True)
class BatchingOptions:
    kind: str = "clockwork"  # clockwork | tfserving
    max_batch: int = 16
    shed: bool = True  # drop requests that can no longer meet their deadline (503)
    batch_timeout_ms: float = 5.0  # tfserving: a batch closes this long after its first request
    max_enqueued_batches: int = 64  # tfserving: closed batches that may wait

    def __post_init__(self) -> None:
        if self.kind not in ("clockwork", "tfserving"):
            raise ValueError(f"batching must be clockwork or tfserving, got {self.kind!r}")
        if self.max_batch < 1:
            raise ValueError(f"max batch must be at least 1, got {self.max_batch}")

    def batcher(self) -> Batcher:
        if self.kind == "clockwork":
            return ClockworkBatcher(self.max_batch, drop_late=self.shed)
        return TFServingBatcher(self.max_batch, self.batch_timeout_ms, self.max_enqueued_batches)


@dataclass(frozen=True)
class Step:
    """What the engine does now: drop these snapshot indices (each with its reason), then start a
    batch of the `start` oldest remaining requests; if none, decide again by `wake_at` (or at
    the next arrival when None)."""

    start: int = 0
    drops: tuple[tuple[int, str], ...] = ()
    wake_at: float | None = None


class Scheduler:
    def __init__(self, options: BatchingOptions):
        self.options = options
        self.batcher = options.batcher()
        self._pre_shed = options.shed and options.kind != "clockwork"
        self._full_first = options.shed and options.kind == "clockwork"

    def decide(self, now: float, arrivals: np.ndarray, deadlines: np.ndarray, costs: np.ndarray,
               batch_costs: BatchCosts, scale: float = 1.0) -> Step:
        """`scale` multiplies the predicted batch times: the engine's measured slowdown of batches
        under contention (see engine.py)."""
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
                    return _probe(Step(drops=tuple(drops)), n)
                arrivals, deadlines, costs = arrivals[keep], deadlines[keep], costs[keep]
                exec_ms = batch_costs.exec_ms(costs, scale)
        d: Decision = self.batcher.decide(now, arrivals, deadlines, exec_ms)
        if self._full_first and d.start:
            d = _fuller(now, deadlines, exec_ms, d, self.options.max_batch)
        inner = [(int(i) if keep is None else int(keep[i]), d.reason or "dropped") for i in d.drop]
        # The batch is the `start` oldest requests left after every drop: what the queue takes.
        step = _probe(Step(start=d.start, drops=tuple(sorted(drops + inner)), wake_at=d.wake_at), n)
        return _truthful(step, now, deadlines_all)


def _probe(step: Step, n: int) -> Step:
    """Everything queued predicted late and the worker idle: the newest is run anyway. It costs
    nobody anything, and its batch is a fresh measurement: predictions made while batches were
    slow would otherwise refuse every request after they speed up again."""
    if step.start or not n or len(step.drops) < n or any(why != LATE for _, why in step.drops):
        return step
    return Step(start=1, drops=step.drops[:-1])


def _truthful(step: Step, now: float, deadlines: np.ndarray) -> Step:
    """A drop for lateness is `late` only if the deadline has passed; else `predicted late`."""
    if not any(why == LATE for _, why in step.drops):
        return step
    drops = tuple((i, PREDICTED_LATE if why == LATE and deadlines[i] > now else why) for i, why in step.drops)
    return Step(start=step.start, drops=drops, wake_at=step.wake_at)


def _on_time(t: float, deadlines: np.ndarray, exec_ms: Callable[[int], float], mb: int) -> int:
    """How many of `deadlines` (oldest first) finish by their deadline when served in arrival
    order in full batches from time t, requests already late being dropped (taking no time)."""
    count, i, n = 0, 0, deadlines.size
    full = exec_ms(mb) * 1e-3
    while i < n:
        # skip the requests that cannot make it even alone: they are dropped, not served
        while i < n and deadlines[i] < t + exec_ms(1) * 1e-3:
            i += 1
        if i >= n:
            break
        b = min(mb, n - i)
        end = t + (full if b == mb else exec_ms(b) * 1e-3)
        count += int(np.count_nonzero(deadlines[i:i + b] >= end))
        t, i = end, i + b
    return count


def _fuller(now: float, deadlines: np.ndarray, exec_ms: Callable[[int], float], d: Decision, mb: int) -> Decision:
    """Clockwork's decision, or one that drops the oldest requests to run a full batch when
    that meets more deadlines (see the module doc)."""
    dl = np.delete(np.asarray(deadlines, dtype=np.float64), list(d.drop)) if d.drop else np.asarray(deadlines)
    n = dl.size
    if d.start >= min(mb, n) or n <= mb:  # already full, or nothing waits behind it
        return d
    end_full = now + exec_ms(mb) * 1e-3
    tight = dl < end_full  # cannot meet their deadline in a full batch started now
    rest = dl[~tight]
    if not tight.any() or rest.size < mb:
        return d
    keep_cw = d.start + _on_time(now + exec_ms(d.start) * 1e-3, dl[d.start:], exec_ms, mb)
    drop_full = mb + _on_time(end_full, rest[mb:], exec_ms, mb)
    if drop_full <= keep_cw:
        return d
    # indices are into the queue as passed: map the tight ones back past d.drop
    kept = np.delete(np.arange(np.asarray(deadlines).size), list(d.drop)) if d.drop else np.arange(n)
    extra = tuple(int(i) for i in kept[tight])
    return Decision(start=mb, drop=tuple(sorted(set(d.drop) | set(extra))), reason=LATE)

