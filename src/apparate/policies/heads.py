"""Apparate on heads that keep learning (`apparate+heads`): `LiveHeadsPolicy` in a server, and
the same policy in replay (`ReplayedHeadsPolicy`), fed what a server would feed it.

A server sees the features (each head's input) of its active sites only, so only their heads
learn; a replay does the same from the recording's features (every site's are recorded, the
active ones' used): each batch's answers at a site whose head has changed are re-computed from
its features with the head live at that batch, and its feedback carries the active sites'
features and the final answers, as a server's does. So a replay reaches the decisions a server
would (a server merges batches only while its control thread has fallen behind).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from apparate.core.controller import Config, Feedback
from apparate.core.heads import HeadLearning, SiteHeads, head_scores
from apparate.core.recording import Recording

from .base import AdaptivePolicy, Plan, Policy


class _OnInner(Policy):
    """A policy around an adaptive one (`inner`): its configuration, ramps and controller."""

    adaptive = True
    inner: AdaptivePolicy

    @property
    def controller(self) -> Any:
        return self.inner.controller

    @property
    def config(self) -> Config:
        return self.inner.config

    @property
    def pays_ramps(self) -> bool:
        return self.inner.pays_ramps

    def cost_sites(self) -> tuple[int, ...]:
        return self.inner.cost_sites()


# ---------------------------------------------------------------------------------- live serving
@dataclass(frozen=True, eq=False)
class HeadsTable:
    """The heads a server applies, versioned: `heads` maps each site whose head has changed since
    the bundle's to its (W [K, D], b [K]). Replaced whole, never mutated; the engine applies a new
    version between two batches, so no batch sees half of a swap."""

    version: int
    heads: dict[int, tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True, eq=False)
class HeadsFeedback(Feedback):
    """Served batches' feedback for heads that keep learning: beside the ramps' confidences and
    agreement, each active site's pooled features [n, D] (what its head reads), the model's final
    answer [n], and the heads version each input was served with [n]."""

    pooled: tuple[np.ndarray, ...] = ()
    final: np.ndarray | None = None
    heads_version: np.ndarray | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.conf.shape[0]
        if len(self.pooled) != len(self.sites) or any(np.shape(x)[0] != n for x in self.pooled):
            raise ValueError(f"pooled must hold [{n}, D] features for each of the {len(self.sites)} sites")
        for name in ("final", "heads_version"):
            if np.shape(getattr(self, name)) != (n,):
                raise ValueError(f"{name} must have shape ({n},)")


def linear_heads(ee: Any) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Each site's linear head (`model.ramp_results.linear_head`: `pool`, `mean`, `cls` ramps) as
    numpy (W, b); None elsewhere."""
    from apparate.model.ramp_results import linear_head

    out: list[tuple[np.ndarray, np.ndarray] | None] = []
    for ramp in ee.ramps:
        if linear_head(ramp):
            out.append((ramp.head.weight.detach().cpu().double().numpy(), ramp.head.bias.detach().cpu().double().numpy()))
        else:
            out.append(None)
    return out


class LiveHeadsPolicy(_OnInner):
    """`apparate+heads` in a server: the adaptive controller, with each linear ramp head (`pool`,
    `mean`, `cls` ramps) learning on the served stream (`core.heads.SiteHeads`, its final answers
    known after each batch, so no lag). When a site's new head goes live, the controller's window
    rows of that site are re-scored with it from the features kept beside the window (rows without
    them, the bootstrap's, are cleared), the thresholds re-tuned, and a new `HeadsTable` is
    published for the engine.
    Inputs that an older head served are re-scored with the current one as their feedback arrives.
    A checkpoint keeps the heads that changed (`heads_state`), not their buffers."""

    def __init__(self, name: str, inner: AdaptivePolicy, heads: list[tuple[np.ndarray, np.ndarray] | None]):
        ctl = inner.controller
        if len(heads) != ctl.profile.num_sites:
            raise ValueError(f"{len(heads)} heads for {ctl.profile.num_sites} sites")
        if not any(h is not None for h in heads):
            raise ValueError(f"{name} needs ramps with linear heads (pool, mean, cls): this bundle has none")
        self.name, self.inner = name, inner
        how = replace(HeadLearning.from_settings(ctl.settings), lag=0)
        self.learners = {s: SiteHeads(h[0], h[1], how) for s, h in enumerate(heads) if h is not None}
        W = ctl.window.size
        self._feat: dict[int, np.ndarray] = {}  # site -> [W, D] features of the window's rows
        self._have = np.zeros((W, len(heads)), dtype=bool)
        self._final = np.zeros(W, dtype=np.int64)
        self.version = 0
        self._site_version = {s: 0 for s in self.learners}  # the version at which each site's head last changed
        self.history: dict[int, HeadsTable] = {0: HeadsTable(0, {})}
        self.swaps = 0

    def table(self) -> HeadsTable:
        return self.history[self.version]

    def heads_state(self) -> dict[str, Any]:
        """The heads that have changed since the bundle's, for a checkpoint (JSON). Their buffers
        and candidates are not saved: learning goes on from the inputs served after a restart."""
        return {"version": self.version,
                "heads": {str(s): {"w": w.tolist(), "b": b.tolist()} for s, (w, b) in self.table().heads.items()}}

    def restore_heads(self, state: Any) -> None:
        """Go on with a checkpoint's heads (`heads_state`); ValueError, saying why, if they do not fit."""
        if not isinstance(state, dict) or not isinstance(state.get("version"), int) or state["version"] < 0 \
                or not isinstance(state.get("heads"), dict):
            raise ValueError("heads state must be {version: int >= 0, heads: {site: {w, b}}}")
        heads: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for key, h in state["heads"].items():
            try:
                s = int(key)
                w, b = np.asarray(h["w"], dtype=np.float64), np.asarray(h["b"], dtype=np.float64)
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"head of site {key!r} is not a W, b pair of numbers ({e})") from None
            live = self.learners.get(s)
            if live is None or w.shape != live.w.shape or b.shape != live.b.shape or not np.isfinite(w).all() \
                    or not np.isfinite(b).all():
                raise ValueError(f"head of site {key!r} does not fit this model's ramp there")
            heads[s] = (w, b)
        for s, (w, b) in heads.items():
            self.learners[s].w, self.learners[s].b = w, b
            self._site_version[s] = state["version"]
        self.version = state["version"]
        self.history = {self.version: HeadsTable(self.version, heads)}

    def feedback(self, fb: Feedback) -> Config:
        if not isinstance(fb, HeadsFeedback):
            raise ValueError(f"{self.name} learns from the heads' features: give it HeadsFeedback")
        conf, agree = fb.conf.copy(), fb.agree.copy()
        for j, s in enumerate(fb.sites):  # served by a head that has changed since: its current one's view
            if s in self.learners:
                stale = fb.heads_version < self._site_version[s]
                if stale.any():
                    c, p = self.learners[s].answer(fb.pooled[j][stale])
                    conf[stale, j], agree[stale, j] = c, p == fb.final[stale]
        win = self.controller.window
        start = win.written
        cfg = self.inner.feedback(Feedback.trusted(fb.sites, fb.thresholds, conf, agree, fb.length))
        rows = (start + np.arange(fb.batch_size)) % win.size
        self._have[rows] = False
        self._final[rows] = fb.final
        changed = []
        for j, s in enumerate(fb.sites):
            if s not in self.learners:
                continue
            x = np.asarray(fb.pooled[j], np.float32)
            ring = self._feat.get(s)
            if ring is None:
                ring = self._feat[s] = np.zeros((win.size, x.shape[1]), np.float32)
            ring[rows] = x
            self._have[rows, s] = True
            if self.learners[s].observe(x, fb.final):
                changed.append(s)
        if changed:
            self.version += 1
            self.swaps += len(changed)
            heads = dict(self.history[self.version - 1].heads)
            for s in changed:
                self._site_version[s] = self.version
                heads[s] = (self.learners[s].w, self.learners[s].b)
                self._rescore(s)
            self.history[self.version] = HeadsTable(self.version, heads)
            self.controller.rescored(f"new heads at sites {changed}")
            cfg = self.controller.config
        return cfg

    def _rescore(self, s: int) -> None:
        win = self.controller.window
        n = min(win.written, win.size)
        rows = win.last(n)
        ran = ~np.isnan(win.conf[rows, s])
        have = self._have[rows, s] & ran
        if have.any():
            r = rows[have]
            c, p = self.learners[s].answer(self._feat[s][r])
            win.conf[r, s] = c
            win.agree[r, s] = p == self._final[r]
        gone = rows[ran & ~have]  # rows without features (the bootstrap's): cleared at this site
        win.conf[gone, s] = np.nan
        win.agree[gone, s] = False


class ReplayedHeadsPolicy(LiveHeadsPolicy):
    """`apparate+heads` in replay: the server's policy, on a recording with the ramps' features.
    The recording's answers are those of the bundle's heads; a site whose head has changed
    answers from its features with the head live now (`ramp_answers`), and each batch's feedback
    is a server's (`HeadsFeedback`: the active sites' features, the final answers)."""

    def __init__(self, name: str, inner: AdaptivePolicy, stream: Recording):
        if stream.features is None or stream.heads is None:
            raise ValueError(f"{name} needs a recording with the ramps' features (apparate record ... --features)")
        super().__init__(name, inner, [(np.asarray(w, np.float64), np.asarray(b, np.float64)) for w, b in stream.heads])
        self.stream = stream
        self._index: slice | np.ndarray | None = None

    def stream_inputs(self, index: slice | np.ndarray) -> None:
        self._index = index

    def ramp_answers(self, index: slice | np.ndarray, conf: np.ndarray, agree: np.ndarray,
                     pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        heads = self.table().heads
        if not heads:
            return conf, agree, pred
        conf, agree, pred = conf.copy(), np.array(agree), np.array(pred)
        final = self.stream.final[index]
        for s, (w, b) in heads.items():
            c, p = head_scores(self.stream.features[s][index].astype(np.float32), w, b)
            conf[:, s], pred[:, s], agree[:, s] = c, p, p == final
        return conf, agree, pred

    def plan(self, conf: np.ndarray, agree: np.ndarray, pred: np.ndarray | None = None,
             move: np.ndarray | None = None) -> Plan:
        return self.inner.plan(conf, agree, pred, move)

    def observe(self, plan: Plan, conf: np.ndarray, agree: np.ndarray, length: float | None = None,
                correct: np.ndarray | None = None, final: np.ndarray | None = None) -> None:
        if self._index is None:
            raise ValueError(f"{self.name} needs the batch's stream positions (stream_inputs) before observe")
        ix, self._index = self._index, None
        cols = list(plan.sites)
        feats = self.stream.features
        self.feedback(HeadsFeedback(plan.sites, plan.thresholds, conf[:, cols], agree[:, cols], length,
                                    pooled=tuple(np.asarray(feats[s][ix], np.float32) for s in plan.sites),
                                    final=np.asarray(self.stream.final[ix], np.int64),
                                    heads_version=np.full(conf.shape[0], self.version, dtype=np.int64)))

    def observe_stopped(self, plan: Plan, conf: np.ndarray, agree: np.ndarray, length: float | None,
                        correct: np.ndarray, completed: np.ndarray, weight: np.ndarray) -> None:
        raise ValueError(f"{self.name} keeps every input to the end (heads learn from every final answer)")
