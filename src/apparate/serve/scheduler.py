"""The scheduler: the replay batchers' decisions applied to the live queue.

The same `ClockworkBatcher` / `TFServingBatcher` objects the simulator uses decide here, on a
snapshot of the queue (oldest first) with the batch time predicted from the live profile for
the active ramps. The engine thread calls `decide` only while its worker is idle (it is the
worker), so `start` is always applicable; drops are applied at once.

Load shedding. Clockwork judges deadlines itself (`drop_late`). TF Serving does not know
deadlines, so with shedding on the scheduler removes, before asking it, every queued request
that could not finish by its deadline even in a batch of one: the same rule Clockwork applies.
With shedding off, late requests are served late and counted as such.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from apparate.core.batchers import LATE, Batcher, ClockworkBatcher, Decision, TFServingBatcher, finish_time

from .costs import BatchCosts


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

    def decide(self, now: float, arrivals: np.ndarray, deadlines: np.ndarray, costs: np.ndarray,
               batch_costs: BatchCosts) -> Step:
        exec_ms = batch_costs.exec_ms(costs)
        keep = None
        drops: list[tuple[int, str]] = []
        if self._pre_shed:
            late = finish_time(now, exec_ms(1)) > deadlines
            if late.any():
                drops = [(int(i), LATE) for i in np.flatnonzero(late)]
                keep = np.flatnonzero(~late)
                if keep.size == 0:
                    return Step(drops=tuple(drops))
                arrivals, deadlines, costs = arrivals[keep], deadlines[keep], costs[keep]
                exec_ms = batch_costs.exec_ms(costs)
        d: Decision = self.batcher.decide(now, arrivals, deadlines, exec_ms)
        inner = [(int(i) if keep is None else int(keep[i]), d.reason or "dropped") for i in d.drop]
        # The batch is the `start` oldest requests left after every drop: what the queue takes.
        return Step(start=d.start, drops=tuple(sorted(drops + inner)), wake_at=d.wake_at)
