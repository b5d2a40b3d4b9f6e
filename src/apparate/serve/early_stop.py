"""Work-conserving early stop: released inputs leave their batch's pass while work is waiting.

Apparate releases an input at the first ramp confident enough, and by default the batch still runs
to its end: the input's final answer is the controller's free feedback. When requests are waiting
in the queue, that compute is what they wait for. Early stop is the scheduler's rule for that case:

* At a ramp that releases inputs, if `waiting()` says work is waiting right now, each released
  input leaves the rest of the batch's forward pass (the EarlyExitModel cuts its row out; a batch
  whose rows have all left stops and the next one starts), unless a coin with probability `sample`
  keeps it: a kept exited input runs to the end, and its feedback row carries weight 1/sample.
  With nothing waiting every input runs to the end (full feedback, weight 1), so feedback is
  complete whenever it is free.
* Only at a ramp after which enough of the pass remains (`Settings.stop_min_rest`,
  `core.sampling.leave_sites`, as the replay decides): leaving later saves less than it costs.
* With a feedback pool (`Settings.stop_pool`, `core.sampling.FeedbackPool`), inputs that leave
  join it while it has room, and the engine runs them again, from the start, while its queue is
  empty (`run_pool`): their feedback comes late, with weight 1, and costs idle time only. A
  re-run is abandoned at the first ramp where a request is waiting (they go back to the pool),
  and an input that waited `stop_pool_age` inputs runs even then. An input kept by the coin then
  weighs 1 as well, since it would have completed either way; 1/sample only if the pool was full.
* An input whose caller asked for the model's own answer as well (`Request.final`) never leaves:
  its observation probability is 1, so its weight stays 1.
* Only rows that reached the final output are feedback (their agreement is known); weighting the
  sampled exited rows by the inverse of their probability makes every count of the controller's
  window an unbiased (Horvitz-Thompson) estimate of what the full batch would have shown.

The share is `core.sampling.FeedbackSampler`'s, the object the replay's `apparate-stop` uses: the
floor `sample`, raised to every input for a while after a sampled early answer proves wrong or the
share released early shifts; it is updated after each batch (`after`), so it is fixed for every
coin of a batch and the weights stay exact.

The decision is taken once per input, at the ramp that releases it. Only the confidence rule does
early stop; the learned exit rule (`apparate-learned`) keeps every input to the end (its evidence
features compare consecutive inputs' answers, which dropped inputs would not have).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from apparate.core.sampling import FeedbackPool, FeedbackSampler, bolder_than

log = logging.getLogger("apparate.serve")


@dataclass(eq=False)
class EarlyStop:
    """The early-stop rule for a batch. `waiting`: whether work is waiting now (the engine's queue
    holds requests); `sample`: the probability that a released input still runs to the end while
    work waits (pick it so that 1/sample is an integer: the weights are then whole rows);
    `rng`: the coin (seeded, so that a run can be repeated)."""

    waiting: Callable[[], bool]
    floor: float = 0.05
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    alarm: int = 256
    watch_bolder: bool = False  # also look harder after the configuration became bolder
    sites: frozenset[int] | None = None  # where released inputs may leave (None: every ramp)
    pool: FeedbackPool | None = None  # where inputs that leave wait to run again (None: they do not)
    pool_batch: int = 1  # pooled inputs run again at most this many at a time

    def __post_init__(self) -> None:
        self.sampler = FeedbackSampler(check_sample(self.floor), self.alarm)

    @property
    def sample(self) -> float:
        """The probability, now, that a released input runs to the end while work waits."""
        return self.sampler.share

    @property
    def weight(self) -> float:
        """The feedback weight of a released input that was sampled to run to the end."""
        return 1.0 / self.sample

    def may_leave(self, site: int) -> bool:
        """Whether inputs released at `site` may leave at all (`core.sampling.leave_sites`: not
        where too little of the pass remains for leaving to pay)."""
        return self.sites is None or site in self.sites

    def leaving(self, count: int) -> np.ndarray:
        """[count] bool: which of `count` inputs released now leave the pass (work is waiting;
        the caller has checked). Each stays with probability `sample`."""
        if self.sample >= 1.0:
            return np.zeros(count, dtype=bool)
        return self.rng.random(count) >= self.sample

    def leave(self, batch: Sequence[Any], idx: np.ndarray, stays: np.ndarray, config: Any, j: int
              ) -> tuple[np.ndarray, np.ndarray]:
        """Inputs `idx` of `batch` released now at ramp `j` of `config` while work waits; `stays`:
        those that never leave (their callers want the final answer too). Returns which leave, and
        the feedback weights of the rest: 1/sample for those the coin kept, 1 if the pool would have
        taken them. Those that leave join the pool while it has room, first come first."""
        go = self.leaving(idx.size) & ~stays
        room = 0 if self.pool is None else self.pool.room
        before = np.cumsum(go) - go  # inputs that left before each one, here
        weight = np.where(stays | (before < room), 1.0, self.weight)
        if room and go.any():
            self.pool.add([(batch[i], config, j) for i in idx[go][:room].tolist()])
        return go, weight

    def run_pool(self, executor: Any, queued: bool, submit: Callable[[Any], None]) -> bool:
        """The pool's turn on the engine thread, before a batch is chosen: run pooled inputs again
        if nothing is `queued` (abandoned at the first ramp where work waits), or if the oldest is
        overdue; `submit` takes the feedback. Whether it used the worker."""
        pool = self.pool
        turn = None if pool is None else pool.turn(queued, self.pool_batch, same=lambda a, b: a[1] is b[1])
        if turn is None:  # (`same`: one configuration per run)
            return False
        entries, forced = turn
        reqs, config = [e[1][0] for e in entries], entries[0][1][1]
        pos = np.fromiter((e[1][2] for e in entries), dtype=np.int64, count=len(entries))
        try:
            report = executor.rerun(reqs, pos, config, (lambda: False) if forced else self.waiting)
        except Exception as e:  # noqa: BLE001 - feedback only: nobody waits for it, and it is not retried
            log.warning("a pooled input's run failed: %s: %s", type(e).__name__, e)
            pool.counts["failed"] += len(entries)
            return True
        if report is None:
            pool.put_back(entries)
        else:
            pool.done(entries, forced)
            submit(report)
        return True

    def after(self, report: Any, config: Any = None, served: int = 0) -> None:
        """A batch of `served` inputs served: update the sampled share (`FeedbackSampler.update`);
        `config`, the configuration the next batch runs (for `watch_bolder`)."""
        if self.pool is not None:
            self.pool.served += served
        if report is None or not report.feedback:
            return
        bolder = False
        if self.watch_bolder and config is not None:
            bolder = bolder_than(report.sites, report.thresholds, config)
        early = report.exit_pos < len(report.sites)
        sampled = early & (report.weight > 1.0) if report.weight is not None else np.zeros_like(early)
        if report.known is not None:
            sampled &= report.known
        self.sampler.update(early, bool((sampled & ~report.released_agree).any()), bolder)


def check_sample(sample: float) -> float:
    """`sample` as a setting: in (0, 1]."""
    sample = float(sample)
    if not 0.0 < sample <= 1.0:
        raise ValueError(f"the early-stop sample must be in (0, 1], got {sample}")
    return sample


def stop_sample(on: bool | None, sample: float | None, settings: Any, kind: str) -> float | None:
    """The sample early stop serves with, None when it is off: the engine's options where given,
    else the controller settings' `early_stop` and `stop_sample` (off and 0.05 by default)."""
    if settings is None:
        from apparate.core.settings import Settings

        settings = Settings.for_kind(kind)
    if not (on if on is not None else bool(getattr(settings, "early_stop", False))):
        return None
    if getattr(settings, "stop_pool_resume", False):  # refused before the model is calibrated
        raise ValueError("stop_pool_resume is for the replay only: a server runs pooled inputs again from the "
                         "start (its ramps are hooks on the unchanged model, which cannot be entered at a site)")
    return check_sample(sample if sample is not None else getattr(settings, "stop_sample", 0.05))


def engine_stop(sample: float | None, waiting: Callable[[], bool], seed: int = 0, settings: Any = None,
                sites: frozenset[int] | None = None) -> EarlyStop | None:
    """The engine's rule (None when `sample` is None: off), with the controller `settings`' alarm,
    `stop_alarm_bolder` and feedback pool."""
    if sample is None:
        return None
    return EarlyStop(waiting, sample, np.random.default_rng(seed), int(getattr(settings, "stop_alarm", 256)),
                     bool(getattr(settings, "stop_alarm_bolder", False)), sites, FeedbackPool.of(settings),
                     int(getattr(settings, "stop_pool_batch", 1)))


def stop_state(engine: Any) -> dict[str, Any]:
    """Early stop as /earlyexit shows it: on or off, the sample, why a model refused it."""
    stop, why = engine.early_stop, engine.executor.drop_refused
    return {"on": stop is not None and why is None, "sample": None if stop is None else stop.sample,
            **({"floor": stop.sampler.floor, "alarms": dict(stop.sampler.alarms)} if stop is not None else {}),
            **({"pool": {"size": len(stop.pool), "cap": stop.pool.cap, **stop.pool.counts}}
               if stop is not None and stop.pool is not None else {}),
            **({"refused": why} if stop is not None and why is not None else {})}
