"""Apparate with a learned exit rule: the controller tunes thresholds on `core.evidence` scores
(P(the ramp agrees with the final answer), learned from the stream's own final answers) instead
of the ramps' raw confidence. Everything else is the adaptive controller as it is."""

from __future__ import annotations

import numpy as np

from apparate.core.controller import Controller, Feedback
from apparate.core.evidence import EvidenceModel, StreamContext, features
from apparate.core.exits import first_exit
from apparate.core.recording import Recording

from .base import AdaptivePolicy, Plan


def sequence_features(rec: Recording, sites: np.ndarray) -> np.ndarray:
    """Features of a recording's inputs served one at a time, in order: [n, len(sites), F]."""
    ctx = StreamContext.empty(rec.num_sites)
    conf, pred = rec.conf[:, sites].astype(np.float64), rec.pred[:, sites].astype(np.int64)
    move = None if rec.move is None else rec.move[:, sites]
    last = np.concatenate([[-1], rec.final[:-1].astype(np.int64)])  # each input knows the one before
    return features(conf, pred, sites, ctx, move, last)


class LearnedPolicy(AdaptivePolicy):
    """`apparate-learned`: thresholds act on a learned, calibrated probability of agreement."""

    def __init__(self, name: str, controller: Controller, bootstrap: Recording, seed_window: bool = True):
        super().__init__(name, controller)
        s = controller.settings
        S = controller.profile.num_sites
        W = controller.window.size
        self.model = EvidenceModel(S, W, s.evidence_min_inputs, s.evidence_train_inputs, s.evidence_refit_inputs,
                                   s.evidence_l2, s.evidence_guard, s.evidence_guard_loss)
        self.ctx = StreamContext.empty(S)
        all_sites = np.arange(S)
        if seed_window and controller.window.written:
            # the window starts with the bootstrap's inputs: keep their features in the same rows
            n = controller.window.written
            self.model.add(all_sites, sequence_features(bootstrap.take(slice(-n, None)), all_sites),
                           bootstrap.agree[-n:])
        self._pending: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # features, scores, answers
        self._refit()

    def plan(self, conf: np.ndarray, agree: np.ndarray, pred: np.ndarray | None = None,
             move: np.ndarray | None = None) -> Plan:
        if pred is None:
            raise ValueError(f"{self.name} needs each ramp's answer (pred) to plan a batch")
        cfg = self.controller.config
        cols = np.asarray(cfg.sites, dtype=np.int64)
        X = features(conf[:, cols], pred[:, cols].astype(np.int64), cols, self.ctx,
                     None if move is None else move[:, cols])
        score = self.model.score(X, cols, conf[:, cols])
        self._pending = (X, score, pred[:, cols].astype(np.int64))
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

    def _refit(self) -> None:
        if not self.model.refit():
            return
        win = self.controller.window
        rows = win.last(win.size)
        new = self.model.rescored(rows, win.conf[rows])
        old = win.conf[rows]
        win.conf[rows] = np.where(np.isnan(old), old, np.where(np.isnan(new), old, new))
        self.controller.rescored(f"evidence v{self.model.version}")
