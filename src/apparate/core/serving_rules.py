"""The live server's batching rules, as a layer over any `Batcher` that the replay can run too.

A plain batcher (`ClockworkBatcher`, `TFServingBatcher`) decides from predicted batch times
alone. A server living with real requests needs four more rules; they are here, in `core`,
so that a replay wrapped in `ServingRules` and a live server take the same decisions and
replayed capacity means live capacity.

Pre-shedding. Clockwork judges deadlines itself (`drop_late`). TF Serving does not know
deadlines, so with shedding on every queued request that could not finish by its deadline even
in a batch of one is removed before the inner batcher is asked: the same rule Clockwork applies.
With shedding off, late requests are served late and counted as such.

Full batches under a backlog (Clockwork only, shedding on). Clockwork runs the largest batch that
meets the deadline of every one of the b oldest requests. When the oldest are close to their
deadlines (a batch ran longer than predicted) that batch is small, so throughput drops just
when it is needed most, the requests behind come closer to their deadlines in turn, and the
next batch is small too: measured on a ResNet-20 server at about its capacity, batches averaged
10 inputs of 16 and half the requests were dropped late. So when Clockwork's batch is held below
the max batch by the oldest requests and more are waiting, the layer compares, on the predicted
batch times, how many queued requests meet their deadlines (a) with Clockwork's batch and (b)
dropping the oldest requests that cannot meet theirs in a full batch and running one; it drops
them only when that serves more requests in time. Each option's count serves the rest of the
queue in full batches in arrival order, the way the server's admission predicts it.

The probe. An idle worker never drops everything: when every queued request is predicted late,
the newest is served anyway (late, if the prediction holds). Predictions come from recent
batches; after a slow spell they would otherwise refuse every request for ever, since no batch
would run to show that the spell is over.

Truthful reasons. A drop for lateness is `late` only if the request's deadline has passed
before it could start; one dropped earlier because the predicted batch times say it cannot
finish in time is `predicted late`. TF Serving's own drops stay `queue full`. So one decision
carries a reason per drop (`Decision.reasons`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .batchers import LATE, Batcher, ClockworkBatcher, Decision, ExecMs, finish_time

PREDICTED_LATE = "predicted late"  # dropped at batch time before its deadline passed (see above)
SERVE_SUFFIX = "+serve"  # a replay batching name with the live rules over it, e.g. clockwork+serve
# the batchings a replay (`ExperimentSpec.batching`, `--batching`) may name
BATCHINGS = ("clockwork", "tfserving", "clockwork" + SERVE_SUFFIX, "tfserving" + SERVE_SUFFIX)

# kept queue indices (ascending, into the queue as passed) -> the batch-time predictor for that
# shorter queue; batch times of padded text depend on which requests are in the batch
Reprice = Callable[[np.ndarray], ExecMs]
Plan = tuple[int, list[tuple[int, str]], Optional[float]]  # start, (index, reason) drops, wake_at


@dataclass(frozen=True)
class ServingRules:
    """`inner` plus the live server's rules (module doc); itself a `Batcher`.

    Configured as the server configures it: with `shed`, a `ClockworkBatcher` gets the
    full-batch rule (it sheds late requests itself, built with `drop_late=shed`) and any other
    batcher gets pre-shedding; the probe and truthful reasons apply always.
    """

    inner: Batcher
    shed: bool = True

    # `drive` passes a `reprice` to batchers that say they take one
    takes_reprice = True

    @property
    def max_batch(self) -> int:
        return self.inner.max_batch

    @property
    def pre_shed(self) -> bool:
        return self.shed and not isinstance(self.inner, ClockworkBatcher)

    @property
    def fuller(self) -> bool:
        return self.shed and isinstance(self.inner, ClockworkBatcher)

    def decide(self, now: float, arrivals: np.ndarray, deadlines: np.ndarray, exec_ms: ExecMs,
               reprice: Reprice | None = None) -> Decision:
        """As `Batcher.decide`. `reprice` gives the predictor for the queue left after
        pre-shedding; without it `exec_ms` is reused, exact when batch time depends on size only."""
        deadlines_all = np.asarray(deadlines, dtype=np.float64)
        arrivals = np.asarray(arrivals, dtype=np.float64)
        deadlines = deadlines_all
        n = deadlines.size
        keep = None
        drops: list[tuple[int, str]] = []
        if self.pre_shed:
            late = finish_time(now, exec_ms(1)) > deadlines
            if late.any():
                drops = [(int(i), LATE) for i in np.flatnonzero(late)]
                keep = np.flatnonzero(~late)
                if keep.size == 0:
                    start, merged, wake_at = _probe(0, drops, None, n)
                    return _decision((start, _truthful(merged, now, deadlines_all), wake_at))
                arrivals, deadlines = arrivals[keep], deadlines[keep]
                if reprice is not None:
                    exec_ms = reprice(keep)
        d = self.inner.decide(now, arrivals, deadlines, exec_ms)
        if self.fuller and d.start:
            d = _fuller(now, deadlines, exec_ms, d, self.max_batch)
        inner = [(int(i) if keep is None else int(keep[i]), why or "dropped")
                 for i, why in zip(d.drop, d.drop_reasons())]
        # The batch is the `start` oldest requests left after every drop: what the queue takes.
        start, merged, wake_at = _probe(d.start, sorted(drops + inner), d.wake_at, n)
        return _decision((start, _truthful(merged, now, deadlines_all), wake_at))


def _decision(plan: Plan) -> Decision:
    start, drops, wake_at = plan
    return Decision.per_drop(start, tuple(i for i, _ in drops), tuple(why for _, why in drops), wake_at)


def _probe(start: int, drops: list[tuple[int, str]], wake_at: float | None, n: int) -> Plan:
    """Everything queued predicted late and the worker idle: the newest is run anyway. It costs
    nobody anything, and its batch is a fresh measurement: predictions made while batches were
    slow would otherwise refuse every request after they speed up again."""
    if start or not n or len(drops) < n or any(why != LATE for _, why in drops):
        return start, drops, wake_at
    return 1, drops[:-1], None


def _truthful(drops: list[tuple[int, str]], now: float, deadlines: np.ndarray) -> list[tuple[int, str]]:
    """A drop for lateness is `late` only if the deadline has passed; else `predicted late`."""
    return [(i, PREDICTED_LATE if why == LATE and deadlines[i] > now else why) for i, why in drops]


def _on_time(t: float, deadlines: np.ndarray, exec_ms: ExecMs, mb: int) -> int:
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


def _fuller(now: float, deadlines: np.ndarray, exec_ms: ExecMs, d: Decision, mb: int) -> Decision:
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
