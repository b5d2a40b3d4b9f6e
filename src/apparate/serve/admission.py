"""Admission: whether a request's inputs may enter the engine's queue, all or none.

A request that cannot meet the SLO even alone on an idle server is refused with 413; one that
the work queued ahead of it would make miss its deadline with 503 "overloaded" (with shedding
on); a full or closed queue with 503 too. The engine owns one `Admission` and tells it, per
batch, when the running batch is predicted to end (`busy_until`); everything else it reads off
the engine as it stands (SLO, queue, live batch costs, `margin`).
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .queue import CLOSED, QUEUE_FULL, Refused
from .requests import Rejected, Request

if TYPE_CHECKING:
    from .engine import Engine

# Admission's reason for a 503: the work queued ahead of the request already makes it miss its
# deadline. Distinct from the scheduler's "late" (admitted, then found late at batch time), so
# that /metrics tells a prediction that held from one that did not.
OVERLOADED = "overloaded"
TOO_LARGE = 413  # a request that cannot meet the SLO even on an idle server


class Admission:
    def __init__(self, engine: Engine, text: bool):
        self._engine = engine
        self.shed = engine.options.batching.shed
        self._text = text
        # The costs as measured at start on this (idle) machine: the 413 check takes the lower
        # of this and the live prediction, so a request is never refused as too large only
        # because batches are slower while the server is loaded.
        self.idle_costs = engine.live.costs
        self.idle_scale = 1.0  # measured batch time over the profile's at start (startup.py)
        self.busy_until = 0.0  # predicted end (perf_counter s) of the running batch; 0 when idle
        self._count_lock = threading.Lock()
        self.admitted = 0  # inputs put in the queue

    def idle_ms(self, costs: Sequence[int]) -> float:
        """Predicted time to serve these inputs on an idle server (the lower of start-up's and live)."""
        c = np.asarray(costs, dtype=np.int64) if self._text else None
        return min(self.idle_costs.drain_ms(len(costs), c),
                   self._engine.live.costs.drain_ms(len(costs), c)) * self.idle_scale

    def too_large(self, costs: Sequence[int]) -> str | None:
        """Why a request can never meet the SLO, even alone on an idle server; None if it can."""
        slo = self._engine.options.slo_ms
        need = self.idle_ms(costs)
        if need <= slo:
            return None
        n, mb = len(costs), self._engine.options.batching.max_batch
        fit = 0
        while fit < n and self.idle_ms(list(costs)[: fit + 1]) <= slo:
            fit += 1
        what = "fewer or shorter texts" if self._text else f"at most {fit} inputs per request" if fit else "fewer inputs"
        return (f"this request of {n} inputs needs about {need:.0f} ms on an idle server ({-(-n // mb)} batches of up "
                f"to {mb}), more than the SLO of {slo:.0f} ms: send {what}")

    def finish(self, now: float, count: int, costs: np.ndarray | None) -> float:
        """When the last of `count` inputs queued now will have been served, at the latest (perf_counter s):
        the running batch's end, then the backlog in full batches, each predicted time scaled
        by the 90th percentile of how much longer recent batches took than predicted. A
        promise has to hold for the batches that run slow, not only for the median one: with
        the median, a third of the requests admitted at ~capacity were dropped late here."""
        start = max(now, self.busy_until)
        return start + self._engine.live.costs.drain_ms(count, costs) * self._engine.margin * 1e-3

    def refusal(self, now: float | None = None) -> str | None:
        """Before a request is read or parsed: why it would be refused (503), or None. Checks the
        queue as it stands for the smallest request (one input, the shortest text), so it refuses
        only what cannot be served in time whatever it holds: cheap enough to run first, which is
        what keeps refusing from eating the CPU that serving needs past capacity."""
        q = self._engine.queue
        if q.closed:
            return CLOSED
        n = len(q)
        if n >= q.limit:
            return QUEUE_FULL
        if self.shed and (n or self._engine.running_batch):  # an idle engine takes it (see admit)
            now = time.perf_counter() if now is None else now
            if self.finish(now, n + 1, None) > now + self._engine.options.slo_ms * 1e-3:
                return OVERLOADED
        return None

    def admit(self, reqs: list[Request]) -> bool:
        """Put all or none; refused requests get their result (413 or 503) set here."""
        engine = self._engine
        big = self.too_large([r.cost for r in reqs]) if reqs else None
        if big is not None:
            engine.metrics.drop("too large", len(reqs))
            for r in reqs:
                r.future.set_result(Rejected(TOO_LARGE, big))
            return False

        def deadline_check(queued: Any) -> str | None:
            # Under the queue's lock: the request's own inputs come last, in arrival order. One
            # that finds the engine idle is admitted: it delays nobody, and refusing it would
            # not make it any faster (whether it can ever fit was too_large's question).
            if not self.shed or (not queued and not engine.running_batch):
                return None
            costs = np.fromiter((x.cost for x in (*queued, *reqs)), dtype=np.int64) if self._text else None
            last = self.finish(time.perf_counter(), len(queued) + len(reqs), costs)
            return OVERLOADED if last > reqs[0].deadline else None

        with self._count_lock:
            try:
                engine.queue.put_all(reqs, deadline_check)
            except Refused as e:
                engine.metrics.drop(e.reason, len(reqs))
                for r in reqs:
                    r.future.set_result(Rejected(503, e.reason))
                return False
            self.admitted += len(reqs)
        return True
