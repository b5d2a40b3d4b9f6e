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

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from apparate.core.sampling import FeedbackSampler, bolder_than


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

    def after(self, report: Any, config: Any = None) -> None:
        """A batch served: update the sampled share (`FeedbackSampler.update`); `config`, the
        configuration the next batch runs (for `watch_bolder`)."""
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
    return check_sample(sample if sample is not None else getattr(settings, "stop_sample", 0.05))


def engine_stop(sample: float | None, waiting: Callable[[], bool], seed: int = 0, alarm: int = 256,
                watch_bolder: bool = False, sites: frozenset[int] | None = None) -> EarlyStop | None:
    """The engine's rule (None when `sample` is None: off)."""
    return None if sample is None else EarlyStop(waiting, sample, np.random.default_rng(seed), alarm, watch_bolder,
                                                 sites)


def stop_state(engine: Any) -> dict[str, Any]:
    """Early stop as /earlyexit shows it: on or off, the sample, why a model refused it."""
    stop, why = engine.early_stop, engine.executor.drop_refused
    return {"on": stop is not None and why is None, "sample": None if stop is None else stop.sample,
            **({"floor": stop.sampler.floor, "alarms": dict(stop.sampler.alarms)} if stop is not None else {}),
            **({"refused": why} if stop is not None and why is not None else {})}
