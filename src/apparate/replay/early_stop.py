"""Early stop in replay: a batch whose released inputs leave the forward pass while work waits.

The rule the live executor applies (`serve --early-stop`), on the recording's costs: at each
active ramp, if a request is queued at the moment the ramp has run, the inputs it releases leave
the batch, except a sampled share (probability `share`, a whole 1/share) that runs to the end so
that their final answers keep the controller's feedback unbiased (each weighs 1/share). The rest
of the batch then runs at its smaller batch size, segment by segment, from the LatencyProfile;
a batch whose inputs have all left ends at that ramp. With nothing waiting every input runs to
the end, exactly as without early stop; so do inputs released at a ramp too near the end for
leaving to pay (`core.sampling.leave_sites`: outside `can_leave`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Container

import numpy as np

from apparate.core.profile import LatencyProfile


@dataclass(frozen=True, eq=False)
class StoppedBatch:
    release_ms: np.ndarray  # [k] from the batch's start to each input's answer
    completed: np.ndarray  # [k] bool: the input reached the final output (its answer is known)
    weight: np.ndarray  # [k] inverse probability of having completed (1 where it had to)
    end_ms: float  # when the batch's last row finished (the worker is free)
    deferred: np.ndarray | None = None  # [k] left, into the feedback pool (run again later, weight 1)


def run_stopped(profile: LatencyProfile, sites: tuple[int, ...], length: float | None, exit_pos: np.ndarray,
                start: float, waiting: Callable[[float], bool], share: float | np.ndarray,
                rng: np.random.Generator, can_leave: Container[int] | None = None, room: int = 0) -> StoppedBatch:
    """One batch with early stop. `exit_pos` [k]: each input's releasing ramp (index into `sites`,
    len(sites) = the final output); `waiting(t)`: is a request queued at time t (s, the trace's
    clock); `start`: the batch's start (s); `share`: the sampled share, one for all or per input [k];
    `can_leave`: the sites where released inputs may leave (None: every site); `room`: how many
    inputs that leave may join the feedback pool (`core.sampling.FeedbackPool`), first come first;
    they complete later, with weight 1."""
    shares = np.broadcast_to(np.asarray(share, dtype=np.float64), exit_pos.shape)
    k, R = exit_pos.size, len(sites)
    alive = np.ones(k, dtype=bool)
    weight = np.ones(k)
    rel = np.empty(k)
    deferred = np.zeros(k, dtype=bool)
    b = k
    tab = profile.table(b, sites, length)
    elapsed = 0.0
    reached = 0.0  # backbone time to the last site passed, in the current table
    for j in range(R):
        elapsed += (tab.site_ms[j] - reached) + tab.ramp_ms[j]
        reached = tab.site_ms[j]
        ex = np.flatnonzero(exit_pos == j)
        if not ex.size:
            continue
        rel[ex] = elapsed
        if (can_leave is not None and sites[j] not in can_leave) or not waiting(start + elapsed * 1e-3):
            continue
        p = shares[ex]
        stay = rng.random(ex.size) < p
        alive[ex[~stay]] = False
        # Those that leave join the pool while it has room: then an input completes whatever its
        # coin, and one kept by the coin weighs 1 (else 1/p) if the pool had room at its coin.
        before = np.cumsum(~stay) - ~stay  # inputs that left before each one, in this step
        weight[ex[stay]] = np.where(before[stay] < room, 1.0, 1.0 / p[stay])
        pooled = ex[~stay][:room]
        deferred[pooled] = True
        room -= pooled.size
        left = int(alive.sum())
        if left == 0:
            return StoppedBatch(rel, alive, weight, elapsed, deferred)
        if left != b:  # the rest of the pass runs on fewer rows
            b = left
            tab = profile.table(b, sites, length)
            reached = tab.site_ms[j]
    elapsed += tab.vanilla_ms - reached
    rel[exit_pos == R] = elapsed
    return StoppedBatch(rel, alive, weight, elapsed, deferred)
