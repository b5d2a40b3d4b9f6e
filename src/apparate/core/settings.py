"""Settings: every tunable of the control loops, with its documented default.

Defaults follow the public artifact's constants (reference notes §5.5) where they make sense for
this design and say so where they differ. Windows are counted in inputs, not batches, so that
batch size does not change what they mean.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping


@dataclass(frozen=True)
class Settings:
    # --- accuracy -------------------------------------------------------------------------
    accuracy_constraint: float = 0.01
    """A: max share of released answers that may differ from the original model's (1%)."""
    margin_z: float = 3.0
    """Thresholds are tuned to the largest loss L whose upper confidence bound, L + z sqrt(L (1 - L)
    / n) over the tuning window's n inputs, is within A (notes A5): 0.41% for A = 1% on 1,024
    inputs, 0.19% on 256. Tuned thresholds lose 1.5-2x more on the next inputs than on the window
    they were tuned on (selection and drift, measured on the real recordings: docs/core.md), so z
    is large. The artifact's comments say A - 0.5%, its code effectively A - 0.01%."""
    margin_rule: str = "fixed"
    """'fixed': the margin is `margin_z` always. 'adaptive': the margin learns from the answers
    actually released (every input's final answer says whether its released answer agreed), as
    adaptive conformal inference updates its level: after each input z += margin_gain * (wrong -
    margin_aim * A), kept within [margin_z_min, margin_z_max]. Wrong answers rarer than the aim
    lower z (the tuner spends more of the constraint), a burst of them raises it at once."""
    margin_gain: float = 0.2
    """z's step per wrong answer (and -gain * aim * A per right one): 0 errors in 1,000 inputs
    lower z by 1.6 at A = 1% and aim 0.8; five wrong answers in a row raise it by about 1."""
    margin_aim: float = 0.8
    """The adaptive margin aims for this share of the constraint over the long run."""
    margin_z_min: float = 0.5
    margin_z_max: float = 4.0
    margin_retune: float = 0.5
    """Re-tune when the adaptive z has moved this much since the last tune."""

    # --- learned exit rule (policy `apparate-learned`, core/evidence.py) ---------------------
    evidence_min_inputs: int = 128
    """A site's learned score replaces its confidence once it has this many labelled inputs (it is
    fitted as soon as it has them, then with the others every `evidence_refit_inputs`)."""
    evidence_train_inputs: int = 1024
    """Each site's predictor is fitted on its latest this many inputs (bounded by the window)."""
    evidence_refit_inputs: int = 256
    """Refit every this many inputs (then the window is re-scored and the thresholds re-tuned)."""
    evidence_l2: float = 1.0
    """L2 penalty of the per-site logistic predictors (pseudo-observations' weight)."""
    evidence_guard: float | None = 0.02
    """A site's learned score goes live only if, fitted on the older three quarters of its inputs,
    it releases this share more of the newest quarter than its confidence does within
    `evidence_guard_loss`; else the site keeps its confidence. None: always learned."""
    evidence_guard_loss: float = 0.005
    evidence_movement: bool = True
    """Image streams: the difference detector, how far each site's pooled features moved since the
    previous input (`lmove`). Off, the feature reads 0 and a server's hooks skip the pooled
    features and their movement (on video about 0.05 of the learned rule's 0.19 ms a ramp at batch 1,
    once the detector read the ramp's own pooling; 0.13 of 0.25 before)."""

    # --- heads that keep learning (policies `*+heads`, replay only; core/heads.py) ------------
    head_every: int = 256
    """A candidate head per site is trained, and the previous one judged, every this many inputs."""
    head_buffer: int = 1024
    """Candidates are trained on at most this many of the latest inputs with known answers."""
    head_lag: int = 32
    """Inputs whose final answers are not known yet when a candidate is trained (in flight)."""
    head_gain: float = 0.02
    """A candidate goes live only if, on the inputs it shadowed (never trained on), a threshold on its
    confidence releases this share more than the live head's within the accuracy constraint."""

    # --- early stop (issue 19; `apparate-stop`, `serve --early-stop`) -------------------------
    early_stop: bool = False
    """When work is waiting, inputs released at a ramp leave the rest of their batch's forward
    pass (a sampled share excepted), so the compute they would have spent serves the queue."""
    stop_sample: float = 0.05
    """Share of the inputs released while work waits that still run to the end, for feedback; their
    rows weigh 1/share (Horvitz-Thompson). Rounded so that 1/share is a whole number."""
    stop_alarm: int = 256
    """After a sampled input's early answer proves wrong, this many inputs run to the end (full
    feedback while the controller may be reacting to a change)."""
    stop_alarm_bolder: bool = False
    """Also raise that alarm whenever the controller makes the configuration bolder (a threshold
    raised, a ramp added), so a new configuration is checked on full feedback. Safer under drift,
    at most of early stop's capacity (docs/results.md)."""
    stop_pool: int = 0
    """Inputs that left while work waited join a feedback pool of this size (0: off) and run again,
    from the start, while nothing is queued (`core.sampling.FeedbackPool`): full feedback, late,
    paid for with idle time; the sample above then covers only those that find the pool full."""
    stop_pool_batch: int = 1
    """Pooled inputs run again at most this many at a time: a request that arrives after a pooled
    batch's last ramp waits for the rest of it."""
    stop_pool_resume: bool = False
    """Replay only: a pooled input resumes from the ramp where it left instead of running again
    from the start: what a model that can be entered at a site would give (docs/results.md). The
    live engine cannot (its ramps are hooks on the unchanged model) and refuses the setting."""
    stop_pool_age: int = 512
    """An input waits in the pool for at most this many inputs served; then it runs even while work
    waits, so that every pooled input is observed (weight 1, exactly)."""
    stop_min_rest: float = 0.05
    """A released input leaves its batch only at a ramp after which at least this share of a pass
    remains (batch size 1): leaving later saves less than it costs (the rows' copy, the batch's
    times that no longer update the profile, and the input's own feedback)."""

    # --- ramp budget ------------------------------------------------------------------------
    ramp_budget: float = 0.02
    """B: active ramps may add at most this share to worst-case latency (notes A4; artifact 5%)."""
    budget_slack: float = 0.25
    """Once the profile is measured while serving (its ramp costs vary from one update to the
    next), active ramps are removed over the budget only when they exceed it by this share, and
    then down to within the budget itself; placement and probes always fit the budget. A live
    server otherwise removed and re-placed ramps on the budget's edge every few seconds. A
    prepared profile (every replay) is exact: the budget there is strict."""
    max_ramps: int | None = None
    """Optional cap on the number of active ramps (artifact: 3 for CV, 2 for NLP)."""
    budget_at_served_batch: bool = True
    """Judge the budget at the batch size (and text length) the window's inputs were served at,
    once there is evidence; False: always the worst case over every profiled batch size. On a
    CPU a ramp's fixed cost is 2-3% of a batch-1 pass but well under 1% of a batch of 8."""

    # --- threshold tuning -------------------------------------------------------------------
    window_inputs: int = 1024
    """Tuning window: the most recent inputs (the artifact used the last 4 batches)."""
    recent_inputs: int = 256
    """Violation window: the current thresholds are checked against these latest inputs."""
    seed_window: bool = True
    """Start the window with the bootstrap's held-out inputs (every site observed), so that the
    first tunes have evidence; a detected change in the inputs leaves them behind. Measured on the
    drifting SST-2 stream with all six ramps: 96% of the first phase's inputs released early
    instead of 45% (docs/results.md)."""
    min_tune_inputs: int = 128
    """A configuration is tuned only once this many inputs have seen all its ramps."""
    retune_every_inputs: int = 512
    """Periodic re-tune, so thresholds can also rise when inputs get easier (NLP artifact: every
    100 batches at batch 40). Every 256 inputs measured no better than every 512, for more CPU."""
    thresholds: str = "per-ramp"
    """'per-ramp': one threshold per active ramp (the paper's greedy search); 'shared': one
    confidence threshold for every active ramp; 'level': one level on each ramp's calibrated
    probability of agreement (`tuning.level_threshold`). The last two estimate one parameter."""
    init_step: float = 0.01
    min_step: float = 0.001
    agreement: str = "isotonic"
    """Tune on agreement calibrated along confidence ('isotonic') or on raw 0/1 agreement
    ('raw', as the artifact). Raw agreement overfits small windows: see core/calibration."""
    agreement_prior: float = 4.0
    """Pseudo-observations of a ramp's mean agreement added to each isotonic block."""
    violation_z: float = 0.5
    """The current thresholds violate the constraint when their loss on the latest inputs exceeds
    it by this many binomial standard errors (0: any excess, as the artifact)."""
    violation_tune_inputs: int = 256
    """On a violation, re-tune on this many latest inputs, the ones the thresholds fail on (with
    the margin of so few; 0: the whole window of the regime, which the old inputs dominate)."""
    change_evidence: float = 2.0
    """On a violation, a change in the inputs is declared where the current thresholds' errors
    began to exceed twice the constraint, if they exceed it by at least this many wrong answers
    since: the thresholds are then tuned on the inputs from there on alone (a new regime)."""
    min_regime_inputs: int = 16
    """A new regime is tuned on as few as this many inputs (with the margin of so few); fewer, and
    its thresholds are 0 until it has them. It is re-tuned each time it doubles."""
    emergency_after: int = 2
    """Violations in a row before an emergency action (artifact: >= 2 violating batches)."""
    emergency_action: str = "regime"
    """'regime': no separate emergency, violations re-tune on the current regime (above); 'zero'
    (artifact CV) disables the ramps that released wrong answers on the latest inputs; 'shrink'
    (artifact NLP) scales their thresholds."""
    emergency_shrink: float = 0.1

    guard_window: int = 0
    """The window guard (0: off; 500 matches the worst-window check of the project's benchmarks):
    the wrong share of released answers over the latest this many inputs (their final answers say
    which were wrong; at most `window_inputs` are read) is held within `guard_loss` times the
    constraint. When the wrong answers there leave less than the constraint's share of that
    allowance for the next window, the tuner aims for what is left, spread over a window, instead
    of the constraint; it re-tunes when that moves by a quarter of the constraint (on the latest
    `violation_tune_inputs` when it falls, as for a violation), and ramps are not judged meanwhile.
    Off by default: it lifts the worst windows of drifting streams but costs their median
    (docs/results.md, "The window guard")."""
    guard_loss: float = 1.5
    """Allowance of the window guard, in constraints (1.5: 7.5 wrong in 500 at A = 1%, i.e. every
    window >= 98.5%, the worst window the project's checks ask)."""

    # --- ramp adjustment --------------------------------------------------------------------
    adjust_every_batches: int = 30
    """Ramp adjustment period (artifact: 30 batches for CV, 100 for NLP; text workloads take 100,
    `for_kind`)."""
    min_adjust_inputs: int = 256
    """...and at least this many inputs since the last adjustment: at batch size 1, 30 batches
    are too little evidence and ramps churn."""
    utility_inputs: int = 512
    """A ramp's utility is pooled over this many latest inputs that saw it (the artifact kept 20
    batches and called a ramp negative when every batch's utility was <= 0, which at batch size
    1 means only a ramp that never releases anything)."""
    min_evidence_inputs: int = 64
    """A ramp is judged only on at least this many inputs of history (the artifact judged an
    empty history as negative)."""
    tune_gap: float = 0.02
    """If re-tuning alone wins this much more latency (fraction of vanilla), adjust nothing
    (artifact: 2 pp for CV, 5 pp for NLP; text workloads take 0.05, `for_kind`)."""
    exit_rate_guard: float = 0.9
    """No deeper ramp is added when the remaining ramps already release this share."""
    new_ramp_threshold: float = 0.0
    """Threshold of a newly added ramp until it is tuned (artifact: 0 for CV, 0.01 for NLP; text
    workloads take 0.01, `for_kind`)."""
    move_removes: str = "lowest"
    """When probing earlier with no room: remove the 'lowest'-utility ramp (notes A7) or the
    'highest' (the artifact's behaviour, for fidelity runs)."""
    cooldown_adjustments: int = 2
    """Damping: a site removed as negative is not re-added for this many adjustments, doubling
    each time it fails again."""

    # --- initial placement ------------------------------------------------------------------
    placement: str = "greedy"
    """'greedy' adds the ramp with the best tuned latency win per cost until none helps;
    'spaced' is the artifact's: greedy count, then evenly spaced positions."""
    placement_batch_size: int = 1
    """Batch size at which placement judges latencies and the budget, when the caller does not
    say where it will serve (a replay passes the batch size its trace gives vanilla; a server
    starts at 1, the strictest for the budget, and re-judges at the batch size it serves)."""

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        need(0 <= self.accuracy_constraint < 1, f"accuracy_constraint must be in [0, 1), got {self.accuracy_constraint}")
        need(self.margin_z >= 0, f"margin_z must be >= 0, got {self.margin_z}")
        need(self.ramp_budget >= 0, f"ramp_budget must be >= 0, got {self.ramp_budget}")
        need(self.budget_slack >= 0, f"budget_slack must be >= 0, got {self.budget_slack}")
        need(self.max_ramps is None or self.max_ramps >= 0, f"max_ramps must be >= 0, got {self.max_ramps}")
        for name in ("window_inputs", "recent_inputs", "min_tune_inputs", "retune_every_inputs",
                     "adjust_every_batches", "utility_inputs", "emergency_after", "placement_batch_size",
                     "min_regime_inputs"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.min_evidence_inputs >= 0, "min_evidence_inputs must be >= 0")
        need(self.min_adjust_inputs >= 0, "min_adjust_inputs must be >= 0")
        need(self.agreement in ("isotonic", "raw"), f"agreement must be isotonic or raw, got {self.agreement!r}")
        need(self.agreement_prior >= 0, "agreement_prior must be >= 0")
        need(self.recent_inputs <= self.window_inputs, "recent_inputs must not exceed window_inputs")
        need(self.min_tune_inputs <= self.window_inputs, "min_tune_inputs must not exceed window_inputs")
        need(0 < self.min_step <= self.init_step, "need 0 < min_step <= init_step")
        need(self.change_evidence > 0, "change_evidence must be > 0")
        need(self.violation_z >= 0, "violation_z must be >= 0")
        need(self.guard_window >= 0, f"guard_window must be >= 0, got {self.guard_window}")
        need(self.guard_loss >= 1, f"guard_loss must be >= 1, got {self.guard_loss}")
        need(0 <= self.exit_rate_guard <= 1, "exit_rate_guard must be in [0, 1]")
        need(0 <= self.new_ramp_threshold <= 1, "new_ramp_threshold must be in [0, 1]")
        need(0 < self.emergency_shrink < 1, "emergency_shrink must be in (0, 1)")
        need(self.cooldown_adjustments >= 0, "cooldown_adjustments must be >= 0")
        need(self.emergency_action in ("regime", "zero", "shrink"),
             f"emergency_action must be regime, zero or shrink, got {self.emergency_action!r}")
        need(self.move_removes in ("lowest", "highest"), f"move_removes must be lowest or highest, got {self.move_removes!r}")
        need(self.thresholds in ("per-ramp", "shared", "level"), f"thresholds must be per-ramp, shared or level, got {self.thresholds!r}")
        need(self.placement in ("greedy", "spaced"), f"placement must be greedy or spaced, got {self.placement!r}")
        need(self.margin_rule in ("fixed", "adaptive"), f"margin_rule must be fixed or adaptive, got {self.margin_rule!r}")
        need(self.margin_gain >= 0, "margin_gain must be >= 0")
        need(0 < self.margin_aim <= 1, "margin_aim must be in (0, 1]")
        need(0 <= self.margin_z_min <= self.margin_z_max, "need 0 <= margin_z_min <= margin_z_max")
        need(self.margin_retune > 0, "margin_retune must be > 0")
        for name in ("evidence_min_inputs", "evidence_train_inputs", "evidence_refit_inputs"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.evidence_l2 >= 0, "evidence_l2 must be >= 0")
        need(0 <= self.evidence_guard_loss < 1, "evidence_guard_loss must be in [0, 1)")
        need(0 < self.stop_sample <= 1, f"stop_sample must be in (0, 1], got {self.stop_sample}")
        need(0 <= self.stop_min_rest < 1, f"stop_min_rest must be in [0, 1), got {self.stop_min_rest}")
        need(self.stop_pool_batch >= 1, f"stop_pool_batch must be >= 1, got {self.stop_pool_batch}")
        need(self.stop_pool >= 0 and self.stop_pool_age >= 1,
             f"need stop_pool >= 0 and stop_pool_age >= 1, got {self.stop_pool} and {self.stop_pool_age}")
        need(self.stop_alarm >= 0, f"stop_alarm must be >= 0, got {self.stop_alarm}")
        need(self.head_every >= 1 and self.head_buffer >= 1 and self.head_lag >= 0,
             "head_every and head_buffer must be >= 1, head_lag >= 0")

    @property
    def stop_share(self) -> float:
        """`stop_sample` as used: 1/k for the nearest whole k, so sampled rows have whole weights."""
        return 1.0 / max(1, round(1.0 / self.stop_sample))

    def tuning_target(self, n: int) -> float:
        """Accuracy loss the tuner aims for on a window of `n` inputs."""
        from .calibration import tuning_target

        return tuning_target(self.accuracy_constraint, n, self.margin_z)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Settings":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown settings: {sorted(unknown)}")
        return cls(**dict(data))

    def replace(self, **changes: Any) -> "Settings":
        return type(self).from_dict({**self.to_dict(), **changes})

    @classmethod
    def for_kind(cls, kind: str, **changes: Any) -> "Settings":
        """The settings of a kind of workload, 'image' or 'text', with `changes` over them. The one
        constructor every entry point uses (server, control loop, replay, bench, api), so that a
        workload is decided alike live and in replay. Text takes the artifact's NLP variants of
        the defaults (notes §5.5, `KIND_DEFAULTS`); its NLP emergency action, 'shrink', stays an
        option: the regime re-tune serves both kinds of input."""
        try:
            base = KIND_DEFAULTS[kind]
        except KeyError:
            raise ValueError(f"unknown kind of workload {kind!r}: choose from {', '.join(KIND_DEFAULTS)}") from None
        return cls.from_dict({**base, **changes})


KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "image": {},
    "text": dict(adjust_every_batches=100, tune_gap=0.05, new_ramp_threshold=0.01),
}
"""What each kind of workload changes in the defaults (`Settings.for_kind`)."""
