"""The policy interface and its three kinds: fixed thresholds, the adaptive controller, an oracle."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from apparate.core.controller import Config, Controller, Feedback
from apparate.core.exits import first_exit
from apparate.core.sampling import FeedbackPool, FeedbackSampler, bolder_than, leave_sites
from apparate.core.types import exit_sites_of


@dataclass(frozen=True, eq=False)
class Plan:
    """What a policy does with one batch."""

    sites: tuple[int, ...]  # active ramps, site order: the batch pays their cost
    exit_pos: np.ndarray  # [n] index into sites where each input is released; len(sites) = final
    thresholds: tuple[float, ...] = ()
    version: int = 0  # configuration version, for timelines
    pay_ramps: bool = True  # False only for the cost-free oracle

    def exit_sites(self) -> np.ndarray:
        """[n] site of release, -1 for the final output."""
        return exit_sites_of(self.sites)[self.exit_pos]


class Policy:
    """Base: what the next batch runs and what a batch taught the policy.

    Two callers, one set of verbs. The simulator (replay) asks `plan` for a batch's exits and
    gives `observe` what the batch showed; the server asks `config` for the configuration its
    executor applies and gives `feedback` the `Feedback` of served batches. Fixed policies ignore
    feedback; adaptive ones learn from it."""

    name: str = "policy"
    adaptive: bool = False
    early_stop: float | None = None  # replay: the sampled share, when exited inputs may leave the batch
    stop_sites: frozenset[int] | None = None  # ... and where they may (None: at every ramp)
    pool: FeedbackPool | None = None  # ... and where those that left wait to run again (None: they do not)

    @property
    def config(self) -> Config:
        """The configuration the next batches run (active ramps and their thresholds)."""
        raise NotImplementedError(f"{self.name} has no configuration a server could apply")

    def feedback(self, fb: Feedback) -> Config:
        """A served batch's feedback; returns the configuration for the next batches."""
        return self.config

    def ramp_answers(self, index: slice | np.ndarray, conf: np.ndarray, agree: np.ndarray,
                     pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Replay: the batch's ramp answers (conf, agree, pred [n, S]) as this policy's ramps give
        them; `index`, the batch's stream positions. The recording's, unless the policy's ramps
        change as it serves (heads that keep learning). The simulator plans, releases, judges and
        gives feedback on what this returns; it never changes its arguments in place."""
        return conf, agree, pred

    def plan(self, conf: np.ndarray, agree: np.ndarray, pred: np.ndarray | None = None,
             move: np.ndarray | None = None) -> Plan:
        """conf, agree: [n, S] over every candidate site for the batch about to run; pred [n, S],
        each ramp's answer, and move [n, S], how far each site's features moved since the previous
        input (None where not recorded), for policies whose exit rule uses more than confidence."""
        raise NotImplementedError

    def observe(self, plan: Plan, conf: np.ndarray, agree: np.ndarray, length: float | None = None,
                correct: np.ndarray | None = None, final: np.ndarray | None = None) -> None:
        """Feedback after the batch ran (every input reached the final output); `correct`, if
        given, says whether each released answer agreed with the original; `final` [n] is the
        original model's answer on each input."""

    def observe_stopped(self, plan: Plan, conf: np.ndarray, agree: np.ndarray, length: float | None,
                        correct: np.ndarray, completed: np.ndarray, weight: np.ndarray) -> None:
        """Feedback after a batch ran with early stop (`early_stop` set): only the `completed` [n]
        inputs reached the final output, so only theirs is known; `weight` [n] is each one's
        inverse sampling probability. Fixed policies learn nothing from it."""

    def cost_sites(self) -> tuple[int, ...]:
        """Ramps the next batch will pay for (for batch-time predictions)."""
        raise NotImplementedError

    def stream_inputs(self, index: slice | np.ndarray) -> None:
        """Replay only: the stream positions of the batch about to be planned. Most policies need
        nothing but the batch's own data; one that keeps per-input state outside it does."""

    @property
    def pays_ramps(self) -> bool:
        return True


class ThresholdPolicy(Policy):
    """Fixed active ramps and thresholds (vanilla, static, one-time tuned baselines)."""

    def __init__(self, name: str, config: Config):
        self.name = name
        self._config = config
        self._cols = np.asarray(config.sites, dtype=np.int64)
        self._thr = np.asarray(config.thresholds, dtype=np.float64)

    @property
    def config(self) -> Config:
        return self._config

    def plan(self, conf: np.ndarray, agree: np.ndarray, pred: np.ndarray | None = None,
             move: np.ndarray | None = None) -> Plan:
        pos = first_exit(1.0 - conf[:, self._cols], self._thr)
        return Plan(self._config.sites, pos, self._config.thresholds, self._config.version)

    def cost_sites(self) -> tuple[int, ...]:
        return self.config.sites


class AdaptivePolicy(Policy):
    """The Apparate controller: thresholds and ramps adapt from every batch's feedback."""

    adaptive = True

    def __init__(self, name: str, controller: Controller, early_stop: float | None = None):
        self.name = name
        self.controller = controller
        s = controller.settings
        self.sampler = None if early_stop is None else FeedbackSampler(early_stop, s.stop_alarm)
        self.stop_sites = leave_sites(controller.profile, s.stop_min_rest)
        self.pool = FeedbackPool.of(s) if early_stop is not None else None
        self._planned: tuple[Config, np.ndarray, np.ndarray] | None = None  # config, its columns, thresholds

    @property
    def config(self) -> Config:
        return self.controller.config

    @property
    def early_stop(self) -> float | None:  # type: ignore[override]
        """The share of exited inputs that run on while work waits (`core.sampling`)."""
        return None if self.sampler is None else self.sampler.share

    @early_stop.setter
    def early_stop(self, share: float | None) -> None:
        self.sampler = None if share is None else FeedbackSampler(share, self.controller.settings.stop_alarm)

    def feedback(self, fb: Feedback) -> Config:
        return self.controller.observe(fb)

    def plan(self, conf: np.ndarray, agree: np.ndarray, pred: np.ndarray | None = None,
             move: np.ndarray | None = None) -> Plan:
        cfg = self.controller.config
        if self._planned is None or self._planned[0] is not cfg:  # a new configuration: index it once
            self._planned = (cfg, np.asarray(cfg.sites, dtype=np.int64), np.asarray(cfg.thresholds, dtype=np.float64))
        _, cols, thr = self._planned
        pos = first_exit(1.0 - conf[:, cols], thr)
        return Plan(cfg.sites, pos, cfg.thresholds, cfg.version)

    def observe(self, plan: Plan, conf: np.ndarray, agree: np.ndarray, length: float | None = None,
                correct: np.ndarray | None = None, final: np.ndarray | None = None) -> None:
        cols = list(plan.sites)
        # The plan came from this controller's config and the data from a validated recording;
        # the simulator already released the batch (exits and their agreement).
        exits = None if correct is None else (plan.exit_pos, correct)
        self.feedback(Feedback.trusted(plan.sites, plan.thresholds, conf[:, cols], agree[:, cols], length, exits))

    def observe_stopped(self, plan: Plan, conf: np.ndarray, agree: np.ndarray, length: float | None,
                        correct: np.ndarray, completed: np.ndarray, weight: np.ndarray) -> None:
        at = np.flatnonzero(completed)
        sampled_wrong = not correct[at][weight[at] > 1.0].all()
        if at.size:
            cols = list(plan.sites)
            w = weight[at]
            self.feedback(Feedback.trusted(plan.sites, plan.thresholds, conf[np.ix_(at, cols)], agree[np.ix_(at, cols)],
                                           length, (plan.exit_pos[at], correct[at]), None if w.max() == 1.0 else w))
        if self.pool is not None:
            self.pool.served += int(plan.exit_pos.size)
        if self.sampler is not None:
            bolder = self.controller.settings.stop_alarm_bolder and \
                bolder_than(plan.sites, plan.thresholds, self.controller.config)
            self.sampler.update(plan.exit_pos < len(plan.sites), sampled_wrong, bolder)

    def observe_late(self, plan: Plan, conf: np.ndarray, agree: np.ndarray, length: float | None,
                     exit_pos: np.ndarray, correct: np.ndarray) -> None:
        """Feedback of pooled inputs run again (`core.sampling.FeedbackPool`), served with `plan`:
        their rows (conf, agree over all sites) weigh 1, as if they had run on."""
        cols = list(plan.sites)
        self.feedback(Feedback.trusted(plan.sites, plan.thresholds, conf[:, cols], agree[:, cols], length,
                                       (exit_pos, correct)))

    def cost_sites(self) -> tuple[int, ...]:
        return self.controller.config.sites


class OraclePolicy(Policy):
    """Every input exits at the earliest site whose answer agrees with the original model's.

    With `pay_ramps` False (the paper's "optimal") ramps cost nothing; with True every
    candidate ramp runs and is paid for (notes A11 reports both).
    """

    def __init__(self, name: str, num_sites: int, pay_ramps: bool = False):
        self.name = name
        self.sites = tuple(range(num_sites))
        self._pay = pay_ramps

    def plan(self, conf: np.ndarray, agree: np.ndarray, pred: np.ndarray | None = None,
             move: np.ndarray | None = None) -> Plan:
        n = agree.shape[0]
        hit = agree.any(axis=1)
        pos = np.where(hit, agree.argmax(axis=1), len(self.sites)) if n else np.zeros(0, dtype=np.int64)
        return Plan(self.sites, pos, (), 0, self._pay)

    def cost_sites(self) -> tuple[int, ...]:
        return self.sites if self._pay else ()

    @property
    def config(self) -> Config:
        raise NotImplementedError("the oracle knows every answer in advance: it exists in replay only")

    @property
    def pays_ramps(self) -> bool:
        return self._pay


class BlockHindsightPolicy(Policy):
    """Every ramp active; each block of `block` consecutive inputs runs its own per-ramp
    thresholds: tuned in hindsight on that very block (an oracle of adaptation: no rule that
    re-tunes from what it has seen follows the stream more closely), or on the block before it
    (the same tuning out of sample). Replay only."""

    def __init__(self, name: str, sites: tuple[int, ...], thresholds: np.ndarray, block: int):
        self.name = name
        self.sites = sites
        self._thr = np.asarray(thresholds, dtype=np.float64)  # [blocks, R]
        self._block = block
        self._at: np.ndarray = np.zeros(0, dtype=np.int64)

    def stream_inputs(self, index: slice | np.ndarray) -> None:
        self._at = np.arange(index.start, index.stop) if isinstance(index, slice) else np.asarray(index)

    def plan(self, conf: np.ndarray, agree: np.ndarray, pred: np.ndarray | None = None,
             move: np.ndarray | None = None) -> Plan:
        blocks = np.minimum(self._at // self._block, len(self._thr) - 1)
        cols = np.asarray(self.sites, dtype=np.int64)
        pos = np.empty(conf.shape[0], dtype=np.int64)
        for b in np.unique(blocks):  # a batch may straddle two blocks
            rows = blocks == b
            pos[rows] = first_exit(1.0 - conf[np.ix_(rows, cols)], self._thr[b])
        return Plan(self.sites, pos, tuple(float(t) for t in self._thr[int(blocks[0])]) if blocks.size else ())

    def cost_sites(self) -> tuple[int, ...]:
        return self.sites

    @property
    def config(self) -> Config:
        raise NotImplementedError("tuned on each block's own answers: it exists in replay only")
