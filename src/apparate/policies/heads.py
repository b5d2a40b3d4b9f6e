"""Apparate on heads that keep learning (`apparate+heads`): `HeadsPolicy` in replay,
`LiveHeadsPolicy` in a server (below).

The replayed recording's answers are already those of the head live at each input
(`core.heads.relearn`, causal). What this wrapper adds is what a server must do at a swap: the
controller's window holds confidences and agreements from the old head, on a scale the new head
does not share, so before the first batch a new head answers, the window's rows of that site are
re-scored with it from the inputs' recorded features, and the thresholds re-tuned
(`Controller.rescored`). Rows the stream did not provide (the bootstrap inputs that seed the
window) have no features here: at a swap they are cleared for that site.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from apparate.core.controller import Config, Feedback
from apparate.core.heads import HeadLearning, HeadsLog, SiteHeads, head_scores
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


class HeadsPolicy(_OnInner):

    def __init__(self, name: str, inner: AdaptivePolicy, stream: Recording, log: HeadsLog):
        if stream.features is None:
            raise ValueError(f"{name} needs a recording with features")
        self.name, self.inner, self.stream = name, inner, stream
        self.pending = sorted((at, s, w, b) for s, site in enumerate(log.live) for at, w, b in site)
        self.seen: deque[int] = deque(maxlen=inner.controller.window.size)  # stream index of each window row
        self.swaps = 0
        self._batch: list[int] = []

    def stream_inputs(self, index: slice | np.ndarray) -> None:
        self._batch = list(range(index.start, index.stop)) if isinstance(index, slice) else [int(i) for i in index]

    def plan(self, conf: np.ndarray, agree: np.ndarray, pred: np.ndarray | None = None,
             move: np.ndarray | None = None) -> Plan:
        if not self._batch:
            raise ValueError(f"{self.name} needs the batch's stream positions (stream_inputs) before plan")
        first = min(self._batch)
        changed = []
        while self.pending and self.pending[0][0] <= first:
            _, s, w, b = self.pending.pop(0)
            self._rescore(s, w, b)
            changed.append(s)
        if changed:
            self.swaps += len(changed)
            self.inner.controller.rescored(f"new heads at sites {sorted(set(changed))}")
        return self.inner.plan(conf, agree, pred, move)

    def observe(self, plan: Plan, conf: np.ndarray, agree: np.ndarray, length: float | None = None,
                correct: np.ndarray | None = None, final: np.ndarray | None = None) -> None:
        self.inner.observe(plan, conf, agree, length, correct, final)
        self.seen.extend(self._batch)
        self._batch = []

    def _rescore(self, s: int, w: np.ndarray, b: np.ndarray) -> None:
        win = self.inner.controller.window
        n = min(win.written, win.size)
        rows = win.last(n)
        k = min(len(self.seen), n)  # the newest k rows are stream inputs; older ones the bootstrap's
        ran = ~np.isnan(win.conf[rows, s])
        if k:
            idx = np.asarray(list(self.seen)[-k:])
            c, p = head_scores(self.stream.features[s][idx].astype(np.float32), w, b)
            r = rows[n - k:]
            keep = ran[n - k:]
            win.conf[r[keep], s] = c[keep]
            win.agree[r[keep], s] = p[keep] == self.stream.final[idx][keep]
        win.conf[rows[: n - k], s] = np.nan
        win.agree[rows[: n - k], s] = False


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
    """Each site's linear head on pooled features (`pool` ramps) as numpy (W, b); None elsewhere."""
    out: list[tuple[np.ndarray, np.ndarray] | None] = []
    for ramp in ee.ramps:
        spec = getattr(ramp, "spec", None)
        if spec is not None and spec.kind == "pool":
            out.append((ramp.head.weight.detach().cpu().double().numpy(), ramp.head.bias.detach().cpu().double().numpy()))
        else:
            out.append(None)
    return out


class LiveHeadsPolicy(_OnInner):
    """`apparate+heads` in a server: the adaptive controller, with each pool ramp's head learning
    on the served stream (`core.heads.SiteHeads`, its final answers known after each batch, so no
    lag). When a site's new head goes live, the controller's window rows of that site are
    re-scored with it from the features kept beside the window (rows without them, the bootstrap's,
    are cleared), the thresholds re-tuned, and a new `HeadsTable` is published for the engine.
    Inputs that an older head served are re-scored with the current one as their feedback arrives.
    A checkpoint keeps the heads that changed (`heads_state`), not their buffers."""

    def __init__(self, name: str, inner: AdaptivePolicy, heads: list[tuple[np.ndarray, np.ndarray] | None]):
        ctl = inner.controller
        if len(heads) != ctl.profile.num_sites:
            raise ValueError(f"{len(heads)} heads for {ctl.profile.num_sites} sites")
        if not any(h is not None for h in heads):
            raise ValueError(f"{name} needs linear heads on pooled features (`pool` ramps): this bundle has none")
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
