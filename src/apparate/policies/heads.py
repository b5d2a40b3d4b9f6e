"""Apparate on heads that keep learning (`apparate+heads`, replay only).

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

import numpy as np

from apparate.core.controller import Config
from apparate.core.heads import HeadsLog, head_scores
from apparate.core.recording import Recording

from .base import AdaptivePolicy, Plan, Policy


class HeadsPolicy(Policy):
    adaptive = True

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

    @property
    def config(self) -> Config:
        return self.inner.config

    @property
    def pays_ramps(self) -> bool:
        return self.inner.pays_ramps

    def cost_sites(self) -> tuple[int, ...]:
        return self.inner.cost_sites()

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
