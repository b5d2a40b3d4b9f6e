"""One active ramp's answers for a batch (`RampResult`), and what a ramp's hook computes and
hands over: its logits (`Ramp.fast`), and on request the features heads that keep learning read
(`pooled`) or the learned exit rule's difference detector reads (`sums`, from the ramp's own
pooling where it pools). Used by `EarlyExitModel`'s hooks, which run inside the model: every
call here is on the hot path of early exits.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from apparate.model.ramps import Ramp, Scorer


class RampResult:
    """One active ramp's answers for a batch: its logits, and its confidence and answer, scored
    from the logits on first use (a ramp whose answers nobody asks for during the batch, one
    that cannot release anything, is scored after the batch with the others, in one step)."""

    __slots__ = ("site", "name", "logits", "_scorer", "_conf", "_pred", "pooled", "sums", "rows")

    def __init__(self, site: int, name: str, logits: torch.Tensor, scorer: Scorer,
                 rows: np.ndarray | None = None) -> None:
        self.site, self.name, self.logits, self._scorer = site, name, logits, scorer
        self.rows = rows  # original batch indices of this ramp's rows; None: every row (none dropped yet)
        self._conf: np.ndarray | None = None
        self._pred: np.ndarray | None = None
        self.pooled: np.ndarray | None = None  # [B, D] the site's pooled features, when the call asked
        self.sums: np.ndarray | None = None  # [B, D] the difference detector's (`pooled_features`), when asked

    @property
    def scored(self) -> bool:
        return self._conf is not None

    @property
    def conf(self) -> np.ndarray:
        """[B] confidence in [0, 1] (float64; a one-element tuple for a batch of one)."""
        if self._conf is None:
            self._conf, self._pred = self._scorer(self.logits)
        return self._conf

    @property
    def pred(self) -> np.ndarray:
        """[B] int64 class index (in the target's label space)."""
        if self._pred is None:
            self._conf, self._pred = self._scorer(self.logits)
        return self._pred  # type: ignore[return-value]


def pooled_features(h: torch.Tensor) -> np.ndarray:
    """[B, D] float32 on the host: the spatial sum of a site's output (flattened if it is not a
    feature map). What the learned exit rule's difference detector compares between inputs: it
    reads a relative change, so a sum serves as a mean would, and a `pool` ramp's head computes
    this very sum (`Ramp.fast_with_sums`), which a server then reads at no second pooling."""
    return _on_host(h.sum(dim=(2, 3)) if h.dim() == 4 else h.flatten(1))


def _on_host(t: torch.Tensor) -> np.ndarray:
    """`t` as a float32 numpy array on the host: a view of a CPU float32 tensor, else a copy."""
    if t.is_cpu and t.dtype is torch.float32:  # (the cheapest tests: this runs inside the model)
        return t.numpy()
    return t.detach().float().cpu().numpy()


LINEAR_KINDS = ("pool", "mean", "cls")


def linear_head(ramp: nn.Module) -> bool:
    """A ramp whose head is one linear layer over its reduction (`pool`, `mean`, `cls`): what heads
    that keep learning retrain from the reduction alone, a recording keeps as features and a
    ramp's result carries as `pooled`. The one test, for recording, serving and the policy. Not
    `grid`: its reduction is not the spatial mean the learned exit rule's movement reads (a
    recording's features are of the spatial mean), so a server and a replay would disagree."""
    return isinstance(ramp, Ramp) and ramp.spec.kind in LINEAR_KINDS and isinstance(ramp.head, nn.Linear)


def features_for(ramp: nn.Module) -> Callable[[torch.Tensor, Any], np.ndarray]:
    """What a ramp's result carries as `pooled` (heads that keep learning read it): a linear
    head's input (its reduction: the spatial mean of a `pool` ramp, the masked token mean of a
    `mean` ramp, [CLS] of a `cls` ramp, as a recording keeps them), else the site's spatial mean."""
    if linear_head(ramp):
        return lambda h, call: _on_host(ramp.reduce(h, call.mask))
    return lambda h, call: _on_host(h.mean(dim=(2, 3)) if h.dim() == 4 else h.flatten(1))


def score_all(results: Sequence[RampResult]) -> None:
    """Score every unscored result in one step (same classes: their logits stack)."""
    todo = [r for r in results if not r.scored]
    if not todo:
        return
    if len(todo) == 1:
        todo[0].conf
        return
    conf, pred = todo[0]._scorer(torch.cat([r.logits for r in todo]))
    at = 0
    for r in todo:  # ramps after a drop have fewer rows
        b = r.logits.shape[0]
        r._conf, r._pred = conf[at:at + b], pred[at:at + b]
        at += b


def fast_for(ramp: nn.Module) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    if isinstance(ramp, Ramp):
        f = ramp.fast()
        return lambda h, call: f(h, call.weights)
    return lambda h, call: ramp(h, call.mask)  # any module with the ramps' (h, mask) signature


def detecting_for(ramp: nn.Module, fast: Callable[[torch.Tensor, Any], torch.Tensor]
                  ) -> Callable[[torch.Tensor, Any], tuple[torch.Tensor, np.ndarray]]:
    """A ramp's logits and the site's `pooled_features`, from one pooling where the head pools
    (else `fast`, the ramp's `fast_for`, and a pooling of its own)."""
    f = ramp.fast_with_sums() if isinstance(ramp, Ramp) else None
    if f is not None:
        def shared(h: torch.Tensor, call: Any) -> tuple[torch.Tensor, np.ndarray]:
            logits, sums = f(h)
            return logits, _on_host(sums)
        return shared
    return lambda h, call: (fast(h, call), pooled_features(h))
