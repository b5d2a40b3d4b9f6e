"""The scheduler: the replay's batching decisions applied to the live queue.

The same `ClockworkBatcher` / `TFServingBatcher` objects the simulator uses decide here, wrapped
in `core.serving_rules.ServingRules`: pre-shedding for TF Serving, full batches under a backlog
for Clockwork, the probe of an idle worker, and truthful reasons (`late` only once a deadline
has passed, else `predicted late`). The rules and why they exist are documented there; a replay
with `--batching clockwork+serve` or `tfserving+serve` runs the very same object.

This module only adapts: it decides on a snapshot of the queue (oldest first) with the batch
time predicted from the live profile for the active ramps (`BatchCosts.exec_ms`, scaled by the
engine's measured slowdown) and turns the `Decision` into the engine's `Step`. The engine thread
calls `decide` only while its worker is idle (it is the worker), so `start` is always
applicable; drops are applied at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from apparate.core.batchers import Batcher, ClockworkBatcher, TFServingBatcher
from apparate.core.serving_rules import PREDICTED_LATE, ServingRules

from .costs import BatchCosts

__all__ = ["PREDICTED_LATE", "BatchingOptions", "Scheduler", "Step"]


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

    def rules(self) -> ServingRules:
        """The batcher with the live rules over it: what the server decides with."""
        return ServingRules(self.batcher(), shed=self.shed)


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
        self.rules = options.rules()
        self.batcher = self.rules.inner

    def decide(self, now: float, arrivals: np.ndarray, deadlines: np.ndarray, costs: np.ndarray,
               batch_costs: BatchCosts, scale: float = 1.0) -> Step:
        """`scale` multiplies the predicted batch times: the engine's measured slowdown of batches
        under contention (see engine.py). `costs` are the queued inputs' token counts (text pads
        a batch to its longest), so the queue left after pre-shedding is re-priced."""
        d = self.rules.decide(now, arrivals, deadlines, batch_costs.exec_ms(costs, scale),
                              reprice=lambda keep: batch_costs.exec_ms(costs[keep], scale))
        return Step(start=d.start, drops=tuple(zip(d.drop, d.drop_reasons())), wake_at=d.wake_at)
