"""Discrete-event replay: arrivals -> batcher -> batch execution -> early release -> feedback.

One worker serves batches back to back (the same `batchers.drive` loop as `run_queue`), but a batch's execution time
comes from the LatencyProfile with the policy's active ramps included, so ramps slow the queue
exactly as they would a server (notes A13). Each input is released when its batch reaches its
exit (its ramp has run); the batch runs to the end regardless, and the policy learns from it
before the next batch forms. A policy with early stop (`Policy.early_stop`) instead lets inputs
released while work waits leave the batch (`replay.early_stop`); it learns only from the inputs
that completed, each weighted by the inverse of its probability of completing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from apparate.core.profile import LatencyProfile
from apparate.core.recording import Recording
from apparate.policies.base import Policy

from apparate.core.batchers import Batcher, drive, finish_time
from apparate.replay.early_stop import run_stopped

DROPPED = -2  # exit_site of a request that was never served
FINAL = -1  # exit_site of a request released by the model's final output


@dataclass(frozen=True, eq=False)
class RunResult:
    """Per request (arrival order) and per batch outcomes of one policy on one trace."""

    policy: str
    slo_ms: float
    num_sites: int
    arrival: np.ndarray  # [n] s
    start: np.ndarray  # [n] s, batch start (NaN if dropped)
    release: np.ndarray  # [n] s, when the answer was released (NaN if dropped)
    exit_site: np.ndarray  # [n] site, FINAL or DROPPED
    correct: np.ndarray  # [n] released answer equals the original model's (False if dropped)
    label_correct: np.ndarray | None  # [n] released answer equals the label (False where no label)
    batch: np.ndarray  # [n] batch index, -1 if dropped
    drop_reason: np.ndarray  # [n] str
    batch_start: np.ndarray  # [B] s
    batch_size: np.ndarray  # [B]
    batch_exec_ms: np.ndarray  # [B]
    batch_version: np.ndarray  # [B] configuration version used
    batch_active: np.ndarray  # [B] number of active ramps
    labeled: np.ndarray | None = None  # [n] the input has a label (label accuracy counts only these)
    batch_sites: tuple[tuple[int, ...], ...] = ()  # [B] the active ramps themselves
    completed: np.ndarray | None = None  # [n] reached the final output (None: every served input did)

    @property
    def served(self) -> np.ndarray:
        return self.exit_site != DROPPED

    @property
    def latency_ms(self) -> np.ndarray:
        """Release minus arrival, ms (NaN if dropped)."""
        return (self.release - self.arrival) * 1e3


def replay(recording: Recording, arrivals: np.ndarray, profile: LatencyProfile, policy: Policy, batcher: Batcher,
           slo_ms: float) -> RunResult:
    """Serve `recording`'s inputs, in order, at the given arrival times (s)."""
    t = np.asarray(arrivals, dtype=np.float64).reshape(-1)
    n = t.size
    if n == 0:
        raise ValueError("empty trace")
    if n > recording.num_inputs:
        raise ValueError(f"trace has {n} arrivals but the recording only {recording.num_inputs} inputs")
    if not np.all(np.isfinite(t)) or np.any(np.diff(t) < 0) or t[0] < 0:
        raise ValueError("arrival times must be finite, non-negative and sorted")
    if recording.num_sites != profile.num_sites:
        raise ValueError(f"recording has {recording.num_sites} sites but the profile {profile.num_sites}: "
                         "they come from different bundles")
    if not slo_ms > 0:
        raise ValueError(f"slo_ms must be positive, got {slo_ms}")

    conf_all = recording.conf
    agree_all = recording.agree
    lengths = recording.lengths
    deadline = t + slo_ms * 1e-3
    start = np.full(n, np.nan)
    release = np.full(n, np.nan)
    exit_site = np.full(n, DROPPED, dtype=np.int64)
    correct = np.zeros(n, dtype=bool)
    batch = np.full(n, -1, dtype=np.int64)
    reason = np.full(n, "", dtype=object)
    released_pred = np.full(n, -1, dtype=np.int64)
    b_start: list[float] = []
    b_size: list[int] = []
    b_exec: list[float] = []
    b_version: list[int] = []
    b_active: list[int] = []
    b_sites: list[tuple[int, ...]] = []

    # Batch times for the batcher, per set of paid ramps: [length, batch size] grids built once
    # (the batcher asks for many batch sizes on every decision).
    grids: dict[tuple[int, ...], np.ndarray] = {}
    sizes = np.arange(1, batcher.max_batch + 1)
    max_len = None if lengths is None else int(lengths.max())

    def exec_for(queue_lengths: np.ndarray | None):
        sites = policy.cost_sites() if policy.pays_ramps else ()
        grid = grids.get(sites)
        if grid is None:
            grid = grids[sites] = profile.end_ms_grid(sites, sizes, None if max_len is None else np.arange(1, max_len + 1))
        if queue_lengths is None:
            row = grid[0]
            return lambda b: float(row[b - 1])
        return lambda b: float(grid[int(queue_lengths[b - 1]) - 1, b - 1])

    final_all, pred_all, move_all = recording.final, recording.pred, recording.move
    completed = np.zeros(n, dtype=bool) if policy.early_stop is not None else None
    rng = np.random.default_rng(0)  # the sampling coins: a replay repeats its decisions

    def run_batch(members: np.ndarray, now: float) -> float:
        k = members.size
        # A batch is usually a run of consecutive requests: slices then index views, not copies.
        m0 = int(members[0])
        ix = slice(m0, m0 + k) if int(members[-1]) - m0 + 1 == k else members
        policy.stream_inputs(ix)
        conf_b, agree_b, pred_b = policy.ramp_answers(ix, conf_all[ix].astype(np.float64), agree_all[ix], pred_all[ix])
        plan = policy.plan(conf_b, agree_b, pred=pred_b, move=None if move_all is None else move_all[ix])
        length = None if lengths is None else float(lengths[ix].max())
        pos = plan.exit_pos
        stopped = None
        share = policy.early_stop  # it may change between batches
        if share is not None:
            last = int(members[-1])  # requests after it that have arrived are queued

            def waiting(at: float) -> bool:
                return int(np.searchsorted(t, at, side="right")) > last + 1

            pool = policy.pool
            stopped = run_stopped(profile, plan.sites, length, pos, now, waiting, share, rng, policy.stop_sites,
                                  0 if pool is None else pool.room)
            if pool is not None and stopped.deferred.any():
                rows = np.flatnonzero(stopped.deferred)
                pool.add([(plan, conf_b[r], agree_b[r], int(pos[r]), None if lengths is None else float(lengths[members[r]]))
                          for r in rows])
            run_ms = stopped.end_ms
            release[ix] = now + stopped.release_ms * 1e-3
            completed[ix] = stopped.completed
        else:
            tab = profile.table(k, plan.sites, length)
            if plan.pay_ramps:
                lat_ms, run_ms = tab.all_ms, tab.end_ms
            else:
                lat_ms, run_ms = np.append(tab.site_ms, tab.vanilla_ms), tab.vanilla_ms
            release[ix] = now + lat_ms[pos] * 1e-3
        start[ix] = now
        ex = plan.exit_sites()
        exit_site[ix] = ex
        at = np.flatnonzero(ex >= 0)
        ok = np.ones(k, dtype=bool)
        rp = final_all[ix].astype(np.int64)
        if at.size:
            ok[at] = agree_b[at, ex[at]]
            rp[at] = pred_b[at, ex[at]]
        correct[ix] = ok
        released_pred[ix] = rp
        batch[ix] = len(b_size)
        b_start.append(now)
        b_size.append(k)
        b_exec.append(run_ms)
        b_version.append(plan.version)
        b_active.append(len(plan.sites) if plan.pay_ramps else 0)
        b_sites.append(plan.sites if plan.pay_ramps else ())
        if stopped is None:
            policy.observe(plan, conf_b, agree_b, length, ok, final=final_all[ix])
        else:
            policy.observe_stopped(plan, conf_b, agree_b, length, ok, stopped.completed, stopped.weight)
        return finish_time(now, run_ms)

    def background(now: float, queued: bool) -> float | None:
        """The feedback pool's turn (`core.sampling.FeedbackPool`): pooled inputs run again while
        nothing is queued (abandoned at the first ramp after a request arrives), or now if overdue."""
        pool = policy.pool
        turn = pool.turn(queued, policy.controller.settings.stop_pool_batch,
                         same=lambda a, b: (a[0].sites, a[0].thresholds) == (b[0].sites, b[0].thresholds))
        if turn is None:
            return None
        entries, forced = turn
        plan = entries[0][1][0]
        length = None if lengths is None else max(e[1][4] for e in entries)
        tab = profile.table(len(entries), plan.sites, length)
        ramp_ms = np.asarray(tab.site_ms) + np.cumsum(tab.ramp_ms)  # from the start to each ramp's end
        # resuming (`stop_pool_resume`): from the earliest ramp where one of them left
        skip = float(ramp_ms[min(e[1][3] for e in entries)]) if policy.controller.settings.stop_pool_resume else 0.0
        if not forced:
            upto = int(np.searchsorted(t, now, side="right"))
            arrival = float(t[upto]) if upto < n else np.inf
            at_ramp = now + (ramp_ms - skip) * 1e-3
            hit = np.flatnonzero((at_ramp >= arrival) & (ramp_ms > skip))
            if hit.size:
                pool.put_back(entries)
                return float(at_ramp[hit[0]])
        pool.done(entries, forced)
        rows = [e[1] for e in entries]
        exit_pos = np.asarray([r[3] for r in rows])  # each left at a ramp: none is the final output
        agree = np.stack([r[2] for r in rows])
        correct = agree[np.arange(len(rows)), np.asarray(plan.sites)[exit_pos]]
        policy.observe_late(plan, np.stack([r[1] for r in rows]), agree, length, exit_pos, correct)
        return finish_time(now, tab.end_ms - skip)

    def exec_ms_for(queue: np.ndarray):
        qlen = None if lengths is None else np.maximum.accumulate(lengths[queue[: batcher.max_batch]])
        return exec_for(qlen)

    def drop(i: int, why: str) -> None:
        reason[i] = why

    for q in drive(t, deadline, batcher, exec_ms_for, run_batch, drop, background if policy.pool is not None else None):
        reason[q] = "unserved"  # nothing more will arrive or wake the batcher

    label_correct = labeled = None
    if recording.labels is not None:
        labels = recording.labels[:n]
        labeled = labels >= 0
        label_correct = (released_pred == labels) & labeled & (exit_site != DROPPED)
    return RunResult(
        policy=policy.name, slo_ms=float(slo_ms), num_sites=profile.num_sites, arrival=t, start=start,
        release=release, exit_site=exit_site, correct=correct, label_correct=label_correct, batch=batch,
        drop_reason=reason.astype(str), batch_start=np.asarray(b_start), batch_size=np.asarray(b_size, dtype=np.int64),
        batch_exec_ms=np.asarray(b_exec), batch_version=np.asarray(b_version, dtype=np.int64),
        batch_active=np.asarray(b_active, dtype=np.int64), batch_sites=tuple(b_sites), labeled=labeled,
        completed=completed,
    )
