"""Apparate with a learned exit rule: the controller tunes thresholds on `core.evidence` scores
(P(the ramp agrees with the final answer), learned from the stream's own final answers) instead
of the ramps' raw confidence. Everything else is the adaptive controller as it is."""

from __future__ import annotations

import numpy as np

from apparate.core.controller import Config, Controller, Feedback
from apparate.core.evidence import EvidenceFeedback, EvidenceModel, Scorer, StreamContext, features
from apparate.core.exits import first_exit
from apparate.core.recording import Recording

from .base import AdaptivePolicy, Plan


def sequence_features(rec: Recording, sites: np.ndarray, movement: bool = True) -> np.ndarray:
    """Features of a recording's inputs served one at a time, in order: [n, len(sites), F]
    (`movement` False: as `evidence_movement` off, the movement feature reads 0)."""
    ctx = StreamContext.empty(rec.num_sites)
    conf, pred = rec.conf[:, sites].astype(np.float64), rec.pred[:, sites].astype(np.int64)
    move = None if rec.move is None or not movement else rec.move[:, sites]
    last = np.concatenate([[-1], rec.final[:-1].astype(np.int64)])  # each input knows the one before
    return features(conf, pred, sites, ctx, move, last)


class LearnedPolicy(AdaptivePolicy):
    """`apparate-learned`: thresholds act on a learned, calibrated probability of agreement.

    Replay calls `plan` / `observe` (the policy computes each batch's features itself). A live
    server calls `feedback` with `EvidenceFeedback`: its executor scored the batch with `scorer()`
    (the snapshot the control thread published) and computed the same features on its own stream
    context; the policy keeps them in its buffer and refits on the same schedule.

    `seed_window`: the controller's window starts with the bootstrap's last inputs (as
    `Controller.from_bootstrap` seeds it), whose features then fill the same buffer rows. Otherwise
    the buffer starts empty, level with the window (a restored controller's window keeps rows
    whose features were not saved: they are not refitted on, and keep their scores)."""

    def __init__(self, name: str, controller: Controller, bootstrap: Recording | None, seed_window: bool = True):
        super().__init__(name, controller)
        s = controller.settings
        S = controller.profile.num_sites
        W = controller.window.size
        self.model = EvidenceModel(S, W, s.evidence_min_inputs, s.evidence_train_inputs, s.evidence_refit_inputs,
                                   s.evidence_l2, s.evidence_guard, s.evidence_guard_loss)
        self.ctx = StreamContext.empty(S)
        all_sites = np.arange(S)
        if seed_window and controller.window.written and bootstrap is not None:
            # the window starts with the bootstrap's inputs: keep their features in the same rows
            n = controller.window.written
            self.model.add(all_sites, sequence_features(bootstrap.take(slice(-n, None)), all_sites, s.evidence_movement),
                           bootstrap.agree[-n:])
        else:  # level with the window: the buffer and the window share their ring positions
            self.model.written = controller.window.written
        self._scorer: Scorer | None = None
        self._pending: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # features, scores, answers
        self._refit()

    def plan(self, conf: np.ndarray, agree: np.ndarray, pred: np.ndarray | None = None,
             move: np.ndarray | None = None) -> Plan:
        if pred is None:
            raise ValueError(f"{self.name} needs each ramp's answer (pred) to plan a batch")
        cfg = self.controller.config
        cols = np.asarray(cfg.sites, dtype=np.int64)
        answers = pred[:, cols].astype(np.int64)
        use = move is not None and self.controller.settings.evidence_movement
        X = features(conf[:, cols], answers, cols, self.ctx, move[:, cols] if use else None)
        score = self.model.score(X, cols, conf[:, cols])
        self._pending = (X, score, answers)
        pos = first_exit(1.0 - score, np.asarray(cfg.thresholds, dtype=np.float64))
        return Plan(cfg.sites, pos, cfg.thresholds, cfg.version)

    def observe(self, plan: Plan, conf: np.ndarray, agree: np.ndarray, length: float | None = None,
                correct: np.ndarray | None = None, final: np.ndarray | None = None) -> None:
        if self._pending is None or final is None:
            raise ValueError(f"{self.name} observes only batches it planned, with their final answers")
        X, score, pred = self._pending
        self._pending = None
        cols = np.asarray(plan.sites, dtype=np.int64)
        ag = agree[:, cols]
        exits = None if correct is None else (plan.exit_pos, correct)
        self.controller.observe(Feedback.trusted(plan.sites, plan.thresholds, score, ag, length, exits))
        self.model.add(cols, X, ag)
        self.ctx.advance(cols, conf[:, cols], pred, np.asarray(final))
        if self.model.due():
            self._refit()

    # ------------------------------------------------------------------ live serving
    def scorer(self) -> Scorer:
        """The current fit as an immutable value, for a server's executor (a new one per refit)."""
        if self._scorer is None or self._scorer.version != self.model.version:
            self._scorer = self.model.scorer()
        return self._scorer

    def evidence_state(self) -> dict:
        """The current fit, for a checkpoint (JSON: NaN weights, an unfitted site's, as null). The
        buffer of features is not saved (window x sites x 9 floats)."""
        w = [[None if np.isnan(v) else float(v) for v in row] for row in self.model.weights]
        return {"version": int(self.model.version), "weights": w}

    def restore_evidence(self, state: dict) -> None:
        """Go on scoring with a checkpoint's fit (`evidence_state`); the buffer starts empty, level
        with the window, and refits use the inputs served from here. ValueError if it does not fit."""
        S = self.model.num_sites
        version, weights = state.get("version"), state.get("weights")
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ValueError(f"evidence version must be a non-negative integer, got {version!r}")
        try:
            w = np.array([[np.nan if v is None else float(v) for v in row] for row in weights], dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"evidence weights are not numbers: {e}") from None
        if w.shape != self.model.weights.shape or np.isinf(w).any():
            raise ValueError(f"evidence weights must be a {S} x {self.model.weights.shape[1]} table of finite numbers "
                             f"or nulls, got shape {w.shape}")
        if not np.array_equal(np.isnan(w), np.isnan(w[:, :1]) & np.ones_like(w, dtype=bool)):
            raise ValueError("an evidence weight row must be all numbers (fitted) or all nulls")
        self.model.weights = w
        self.model.version = version

    def feedback(self, fb: Feedback) -> Config:
        """A served batch (or several served with one configuration, pooled), scored by the
        executor: into the controller's window and the buffer, in arrival order; refit when due.
        Inputs scored by an earlier fit (served before a refit reached the engine) are re-scored
        with the current one, as the window's older rows were at the refit."""
        if not isinstance(fb, EvidenceFeedback):
            raise ValueError(f"{self.name} learns from served batches' features: give it EvidenceFeedback")
        cols = np.asarray(fb.sites, dtype=np.int64)
        score = fb.conf
        stale = fb.scorer_version != self.model.version
        if stale.any():
            score = score.copy()
            score[stale] = self.model.score(fb.features[stale], cols, fb.ramp_conf[stale])
        self.controller.observe(Feedback.trusted(fb.sites, fb.thresholds, score, fb.agree, fb.length, fb.released()))
        self.model.add(cols, fb.features, fb.agree)
        if self.model.due():
            self._refit()
        return self.controller.config

    def _refit(self) -> None:
        if not self.model.refit():
            return
        win = self.controller.window
        rows = win.last(win.size)
        old = win.conf[rows]
        new = self.model.rescored(rows, old)  # NaN where the buffer has no features: keep the row's score
        win.conf[rows] = np.where(np.isnan(new), old, new)
        self.controller.rescored(f"evidence v{self.model.version}")
