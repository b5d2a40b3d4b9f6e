"""Batching policies as pure decisions, shared by the replay simulator and the live server.

A batcher owns no queue, thread or clock. The caller keeps the waiting requests (oldest first,
the running batch excluded) and asks `decide(now, arrivals, deadlines, exec_ms)` whenever
something may have changed: a request arrived, the worker became free, or the time the last
decision asked to be woken at (`wake_at`) came. The answer (`Decision`) says which queued
requests to drop now, how many of the oldest remaining ones to run as one batch now, and if none,
when to ask again. Drops are valid at any time; `start` is meant for an idle worker: a caller
whose worker is busy applies the drops, ignores `start` and asks again when the worker frees.
Writing the policy once this way is what lets a simulated run and a live one batch identically.

Units. Time points (`now`, arrivals, deadlines, `wake_at`, start/finish times) are seconds on the
trace's clock, like `apparate.zoo.traces`. Durations taken from the LatencyProfile or given as
settings are milliseconds and carry a `_ms` suffix (`exec_ms`, `slo_ms`, `batch_timeout_ms`).
The one conversion is `finish_time`, used by every comparison against a deadline here, so a
simulator that uses it too agrees with the batcher to the last bit.

`run_queue` is a small reference driver: one worker serving batches back to back, with predicted
execution times taken as actual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

ExecMs = Callable[[int], float]  # batch size -> predicted execution time in ms (ramps included)

LATE = "late"
QUEUE_FULL = "queue full"


def finish_time(now: float, exec_ms: float) -> float:
    """When a batch started at `now` (s) taking `exec_ms` (ms) ends, in seconds."""
    return now + exec_ms * 1e-3


def _exec(exec_ms: ExecMs, b: int) -> float:
    ms = float(exec_ms(b))
    if not (ms >= 0 and np.isfinite(ms)):
        raise ValueError(f"exec_ms({b}) returned {ms}; batch execution time must be finite and >= 0 ms")
    return ms


@dataclass(frozen=True)
class Decision:
    """What to do with the queue now.

    drop: indices into the queue as passed (ascending) to remove now, all for `reason` unless
      `reasons` gives each its own.
    start: how many of the oldest requests left after the drops to run as one batch now (0: none).
    wake_at: if start is 0, the earliest time (s) at which deciding again without a new arrival
      could start something; None means only a new arrival (or a freed worker) can.
    reasons: empty, or one reason per drop (aligned with `drop`): a layer such as
      `serving_rules.ServingRules` drops some requests as `late` and others as `queue full` in
      one decision. `drop_reasons()` reads either form.
    """

    start: int = 0
    drop: tuple[int, ...] = ()
    reason: str = ""
    wake_at: float | None = None
    reasons: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.reasons and len(self.reasons) != len(self.drop):
            raise ValueError(f"{len(self.reasons)} reasons for {len(self.drop)} drops")

    @classmethod
    def per_drop(cls, start: int, drop: tuple[int, ...], reasons: tuple[str, ...],
                 wake_at: float | None = None) -> "Decision":
        """A decision whose drops may differ in reason; one shared reason is stored as `reason`
        alone, so such a decision equals the one a plain batcher would have made."""
        if len(set(reasons)) <= 1:
            return cls(start=start, drop=drop, reason=reasons[0] if reasons else "", wake_at=wake_at)
        return cls(start=start, drop=drop, reason="", wake_at=wake_at, reasons=reasons)

    def drop_reasons(self) -> tuple[str, ...]:
        """Each drop's reason, aligned with `drop`."""
        return self.reasons if self.reasons else (self.reason,) * len(self.drop)


class Batcher(Protocol):
    max_batch: int

    def decide(self, now: float, arrivals: np.ndarray, deadlines: np.ndarray,
               exec_ms: ExecMs) -> Decision: ...


def _check_max_batch(max_batch: int) -> None:
    if not (isinstance(max_batch, (int, np.integer)) and max_batch >= 1):
        raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")


@dataclass(frozen=True)
class ClockworkBatcher:
    """Clockwork-like: run the largest batch that still meets every member's deadline.

    A request that cannot meet its deadline even alone (now + exec(1) > deadline) is late. With
    `drop_late` every late request is dropped; the rest are served in the largest batch b (up to
    max_batch and the queue length) whose predicted finish now + exec(b) meets the deadline of
    all of its b oldest members. Without dropping, late members impose no constraint (they miss
    anyway) and are served in arrival order, so a batch never makes an on-time member late.

    Work-conserving: whenever the worker is free and a request waits, a batch starts; it never
    holds back to gather a larger batch. That is Clockwork's behaviour, keeps latency minimal at
    low load, and under load the queue grows while the worker is busy, so batches grow by
    themselves. Waiting-to-batch belongs to `TFServingBatcher`.
    """

    max_batch: int
    drop_late: bool = True

    def __post_init__(self) -> None:
        _check_max_batch(self.max_batch)

    def decide(self, now: float, arrivals: np.ndarray, deadlines: np.ndarray,
               exec_ms: ExecMs) -> Decision:
        deadlines = np.asarray(deadlines, dtype=np.float64)
        if deadlines.size == 0:
            return Decision()
        late = finish_time(now, _exec(exec_ms, 1)) > deadlines
        drop: tuple[int, ...] = ()
        if self.drop_late and late.any():
            drop = tuple(int(i) for i in np.flatnonzero(late))
            deadlines, late = deadlines[~late], late[~late]
            if deadlines.size == 0:
                return Decision(drop=drop, reason=LATE)
        cap = min(self.max_batch, deadlines.size)
        # The tightest deadline among the b oldest on-time members, for every b (with drop_late
        # every member left is on time).
        binding = np.minimum.accumulate(deadlines[:cap] if self.drop_late else
                                        np.where(late[:cap], np.inf, deadlines[:cap]))
        for b in range(cap, 0, -1):
            if finish_time(now, _exec(exec_ms, b)) <= binding[b - 1]:
                return Decision(start=b, drop=drop, reason=LATE if drop else "")
        raise AssertionError("unreachable: a single on-time or late request can always start")


@dataclass(frozen=True)
class TFServingBatcher:
    """TF-Serving-like: batches close when full or `batch_timeout_ms` after their first request.

    This mirrors TF Serving's batch scheduler with one batching thread: arriving requests join the
    open batch until it holds max_batch requests or its timeout passes, then a new batch opens;
    closed batches wait for the worker in order, and a request that would open a batch while
    `max_enqueued_batches` batches are already waiting is rejected ('queue full'). Batch
    boundaries depend only on arrival times, so they are rebuilt from the queue on every call and
    the batcher stays stateless; the worker runs the oldest batch exactly as it was formed (a
    batch closed by its timeout stays small even if more requests queued behind it). Deadlines
    are ignored: TF Serving does not know them. A timeout of 0 makes every batch a single request.
    """

    max_batch: int
    batch_timeout_ms: float
    max_enqueued_batches: int

    def __post_init__(self) -> None:
        _check_max_batch(self.max_batch)
        if not (self.batch_timeout_ms >= 0 and np.isfinite(self.batch_timeout_ms)):
            raise ValueError(f"batch_timeout_ms must be finite and >= 0, got {self.batch_timeout_ms}")
        enq = self.max_enqueued_batches
        if not (isinstance(enq, (int, np.integer)) and enq >= 1):
            raise ValueError(f"max_enqueued_batches must be a positive integer, got {self.max_enqueued_batches!r}")

    def decide(self, now: float, arrivals: np.ndarray, deadlines: np.ndarray,
               exec_ms: ExecMs) -> Decision:
        arrivals = np.asarray(arrivals, dtype=np.float64)
        if arrivals.size == 0:
            return Decision()
        timeout_s = self.batch_timeout_ms * 1e-3
        drop: list[int] = []
        batches, size, closes_at = 0, 0, 0.0
        head_size, head_closes_at = 0, 0.0
        for i, a in enumerate(arrivals.tolist()):
            if batches and size < self.max_batch and a < closes_at:
                size += 1
            elif batches < self.max_enqueued_batches:
                batches, size, closes_at = batches + 1, 1, a + timeout_s
            else:
                drop.append(i)
                continue
            if batches == 1:
                head_size, head_closes_at = size, closes_at
        reason = QUEUE_FULL if drop else ""
        if head_size == self.max_batch or now >= head_closes_at:
            return Decision(start=head_size, drop=tuple(drop), reason=reason)
        return Decision(drop=tuple(drop), reason=reason, wake_at=head_closes_at)


# ---------------------------------------------------------------------------------- driver
@dataclass(frozen=True, eq=False)
class QueueResult:
    """Per-request outcome of `run_queue`; times in seconds, NaN for dropped requests."""

    arrival: np.ndarray
    deadline: np.ndarray
    start: np.ndarray
    finish: np.ndarray
    dropped: np.ndarray  # bool
    reason: np.ndarray  # str: '' when served, else the drop reason
    batch: np.ndarray  # index of the request's batch, -1 when dropped
    batch_size: np.ndarray  # per batch, in start order

    @property
    def latency_ms(self) -> np.ndarray:
        """Arrival to batch end, ms (NaN for dropped requests)."""
        return (self.finish - self.arrival) * 1e3

    @property
    def met_slo(self) -> np.ndarray:
        return ~self.dropped & (self.finish <= self.deadline)


def drive(arrivals: np.ndarray, deadlines: np.ndarray, batcher: Batcher,
          exec_ms_for: Callable[[np.ndarray], ExecMs],
          run_batch: Callable[[np.ndarray, float], float],
          drop: Callable[[int, str], None],
          background: Callable[[float, bool], float | None] | None = None) -> list[int]:
    """One worker serving a sorted trace with the batcher's batches, back to back.

    The batcher is asked whenever the worker is idle at an arrival, at a requested `wake_at`, or
    when a batch ends. `exec_ms_for(queue)` gives the batch-time predictor for the current queue
    (request indices, oldest first); `run_batch(members, now)` runs a batch and returns when it
    ends (s); `drop(request, reason)` records a drop, each with its own reason. A batcher with
    `takes_reprice` (`ServingRules`) also gets `reprice`, the predictor for part of the queue.
    Requests arriving at the very instant a decision is made are in the queue for it. Returns
    the requests left waiting when nothing more will arrive or wake the batcher. Checks that the batcher keeps the protocol.
    `background(now, queued)`, if given, is offered the free worker before each decision: it may
    run work of its own (early stop's feedback pool) and return when the worker is free again, or
    None to leave the worker to the batcher.
    """
    t, n = arrivals, arrivals.size
    queue: list[int] = []
    admitted = 0
    now = float(t[0]) if n else 0.0
    while n:
        upto = int(np.searchsorted(t, now, side="right"))
        if upto > admitted:
            queue.extend(range(admitted, upto))
            admitted = upto
        if background is not None:
            free = background(now, bool(queue))
            if free is not None:
                now = free
                continue
        wake = None
        if queue:
            idx = np.asarray(queue)
            if getattr(batcher, "takes_reprice", False):  # a layer that may shorten the queue
                d = batcher.decide(now, t[idx], deadlines[idx], exec_ms_for(idx),  # type: ignore[call-arg]
                                   reprice=lambda keep, idx=idx: exec_ms_for(idx[keep]))
            else:
                d = batcher.decide(now, t[idx], deadlines[idx], exec_ms_for(idx))
            if d.drop:
                why = dict(zip(d.drop, d.drop_reasons()))
                gone = set(why)
                if min(gone) < 0 or max(gone) >= len(queue):
                    raise RuntimeError(f"batcher dropped index outside the queue: {sorted(gone)}")
                for k in gone:
                    drop(queue[k], why[k] or "dropped")
                queue = [q for k, q in enumerate(queue) if k not in gone]
            if d.start:
                if not 0 < d.start <= min(batcher.max_batch, len(queue)):
                    raise RuntimeError(f"batcher started {d.start} of {len(queue)} queued "
                                       f"(max batch {batcher.max_batch})")
                members, queue = np.asarray(queue[: d.start]), queue[d.start:]
                now = run_batch(members, now)
                continue
            wake = d.wake_at
            if wake is not None and not wake > now:
                raise RuntimeError(f"batcher asked to be woken at {wake}, not after now ({now})")
        next_arrival = float(t[admitted]) if admitted < n else np.inf
        nxt = min(next_arrival, np.inf if wake is None else wake)
        if nxt == np.inf:
            free = None if background is None or queue else background(now, False)  # its work is left
            if free is None:
                break
            nxt = free
        now = nxt
    return queue


def run_queue(arrivals: Sequence[float] | np.ndarray, slo_ms: float | np.ndarray, batcher: Batcher,
              exec_ms: ExecMs) -> QueueResult:
    """Serve a trace with one worker running the batcher's batches back to back; each batch
    takes exactly its predicted `exec_ms` (the reference use of `drive`)."""
    t = np.asarray(arrivals, dtype=np.float64).reshape(-1)
    if t.size and (not np.all(np.isfinite(t)) or np.any(np.diff(t) < 0)):
        raise ValueError("arrivals must be finite and sorted")
    n = t.size
    deadline = t + np.asarray(slo_ms, dtype=np.float64) * 1e-3
    start = np.full(n, np.nan)
    finish = np.full(n, np.nan)
    reason = np.full(n, "", dtype=object)
    batch = np.full(n, -1, dtype=np.int64)
    sizes: list[int] = []

    def run_batch(members: np.ndarray, now: float) -> float:
        end = finish_time(now, _exec(exec_ms, members.size))
        start[members], finish[members], batch[members] = now, end, len(sizes)
        sizes.append(members.size)
        return end

    def drop(i: int, why: str) -> None:
        reason[i] = why

    left = drive(t, deadline, batcher, lambda _queue: exec_ms, run_batch, drop)
    if left:
        raise RuntimeError(f"{len(left)} requests left waiting with no arrival or wake-up to come")
    dropped = batch < 0
    return QueueResult(arrival=t, deadline=deadline, start=start, finish=finish, dropped=dropped,
                       reason=reason.astype(str), batch=batch,
                       batch_size=np.asarray(sizes, dtype=np.int64))
