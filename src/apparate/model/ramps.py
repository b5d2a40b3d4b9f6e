"""Ramps: small classifiers attached at sites, and the confidence scores read from them.

Every ramp splits into a parameter-free `reduce` (pooling, taking [CLS], masked mean) and a
trainable `head`. Training caches `reduce`'s output for the bootstrap inputs once, so the frozen
backbone runs a single time however many epochs the ramps need.

Kinds:
- `pool` (CV default, the paper's): global average pooling + linear.
- `grid` (CV, for questions about a part of the view): average pooling to a coarse g x g grid
  (g = `hidden`, default 3) + linear: the ramp keeps where in the frame things are, which global
  pooling averages away, at the cost of a pooling ramp.
- `conv` (CV, stronger): 3x3 convolution (same width, stride 2 on maps 8x8 and up, to bound its
  cost) + ReLU,
  then pooling + linear; it can combine spatial evidence that pooling alone throws away.
- `cls` (NLP, notes A2): linear on the [CLS] hidden state.
- `mean` (NLP default): linear on the attention-masked mean of the hidden states. Measured on the
  fine-tuned MiniLM, [CLS] ramps on layers 0-2 learn nothing (50% held-out agreement, the
  majority answer) while mean-pooled ones reach 82-89%: before the top layers, the [CLS] vector
  of an end-to-end fine-tuned encoder has not gathered the sentence yet.
- `deebert` (NLP baseline): DeeBERT's highway, pooler dense + tanh on [CLS], dropout, linear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CV_KINDS = ("pool", "grid", "conv")
NLP_KINDS = ("cls", "mean", "deebert")
KINDS = CV_KINDS + NLP_KINDS


@dataclass(frozen=True)
class RampSpec:
    """Everything needed to rebuild a ramp (stored in a bundle's manifest)."""

    kind: str
    in_shape: tuple[int, ...]  # the site's output shape per input (no batch dimension)
    num_classes: int
    hidden: int = 0  # conv channels (conv), grid side (grid) or pooler width (deebert); 0 = the kind's default

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown ramp kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.num_classes < 2:
            raise ValueError(f"a ramp needs at least 2 classes, got {self.num_classes}")
        shape = tuple(int(s) for s in self.in_shape)
        object.__setattr__(self, "in_shape", shape)
        if self.kind in CV_KINDS and len(shape) not in (1, 3):
            raise ValueError(f"a {self.kind!r} ramp needs a [C, H, W] or [C] site output, got {list(shape)}")
        if self.kind in NLP_KINDS and len(shape) != 2:
            raise ValueError(f"a {self.kind!r} ramp needs a [tokens, hidden] site output, got {list(shape)}")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_shape": list(self.in_shape), "num_classes": self.num_classes, "hidden": self.hidden}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RampSpec":
        return cls(str(d["kind"]), tuple(d["in_shape"]), int(d["num_classes"]), int(d.get("hidden", 0)))


class Ramp(nn.Module):
    """reduce (no parameters, cacheable) then head (trained)."""

    def __init__(self, spec: RampSpec) -> None:
        super().__init__()
        self.spec = spec
        k, shape, n = spec.kind, spec.in_shape, spec.num_classes
        if k == "pool":
            self.head = nn.Linear(shape[0], n)
        elif k == "grid":
            if len(shape) != 3:
                raise ValueError("a 'grid' ramp needs a [C, H, W] site output")
            g = self.grid = min(spec.hidden or 3, shape[1], shape[2])
            self.head = nn.Linear(shape[0] * g * g, n)
        elif k == "conv":
            if len(shape) != 3:
                raise ValueError("a 'conv' ramp needs a [C, H, W] site output")
            c, h = shape[0], shape[1]
            # Same width, stride 2 on maps of 8x8 and up: ~0.5% of a CIFAR ResNet-56 pass per
            # ramp, so a few of them still fit a 2% ramp budget.
            width = spec.hidden or c
            stride = 2 if h >= 8 else 1
            self.head = nn.Sequential(
                nn.Conv2d(c, width, 3, stride, 1), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, n))
        elif k in ("cls", "mean"):
            self.head = nn.Linear(shape[1], n)
        else:  # deebert
            width = spec.hidden or shape[1]
            self.head = nn.Sequential(nn.Linear(shape[1], width), nn.Tanh(), nn.Dropout(0.1), nn.Linear(width, n))

    def reduce(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        k = self.spec.kind
        if k == "pool":
            return h.mean(dim=(2, 3)) if h.dim() == 4 else h.flatten(1)
        if k == "grid":
            return F.adaptive_avg_pool2d(h, self.grid).flatten(1)
        if k == "conv":
            return h
        if k == "mean":
            if mask is None:
                return h.mean(dim=1)
            m = mask.to(h.dtype).unsqueeze(-1)
            return (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
        return h[:, 0]  # cls, deebert: the [CLS] token

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.reduce(h, mask))

    def fast(self) -> "FastRamp":
        """The same function as `forward`, as the serving hot path runs it: no module calls, two
        to four torch ops. Text `mean` ramps take the batch's token weights, computed once per
        batch (`token_weights`) instead of once per ramp. Equal to `forward` up to float
        rounding."""
        k = self.spec.kind
        # Pooling as a sum with the 1/area folded into the weights: a sum costs less than a mean
        # inside the model (measured, `apparate bench ramps`). The scaled weights are a copy: fast
        # functions are rebuilt when weights change (EarlyExitModel.set_ramp, load_bundle).
        if k == "conv":
            conv, lin = self.head[0], self.head[-1]
            cw, cb, stride = conv.weight.detach(), conv.bias.detach(), conv.stride
            h_out = (self.spec.in_shape[1] + 2 - 3) // stride[0] + 1
            w_out = (self.spec.in_shape[2] + 2 - 3) // stride[1] + 1
            ws, b = (lin.weight.detach().t() / (h_out * w_out)).contiguous(), lin.bias.detach()
            return lambda h, w: torch.addmm(b, F.conv2d(h, cw, cb, stride, 1).relu_().sum((2, 3)), ws)
        if k == "deebert":
            d1, d2 = self.head[0], self.head[-1]
            w1, b1, w2, b2 = d1.weight.detach().t(), d1.bias.detach(), d2.weight.detach().t(), d2.bias.detach()
            return lambda h, w: torch.addmm(b2, torch.addmm(b1, h[:, 0], w1).tanh_(), w2)
        wt, b = self.head.weight.detach().t(), self.head.bias.detach()
        if k == "grid":
            g = self.grid
            return lambda h, w: torch.addmm(b, F.adaptive_avg_pool2d(h, g).flatten(1), wt)
        if k == "pool":
            if len(self.spec.in_shape) == 3:
                ws = self._pool_weights()
                return lambda h, w: torch.addmm(b, h.sum((2, 3)), ws)
            return lambda h, w: torch.addmm(b, h.flatten(1), wt)
        if k == "mean":
            scaled: dict[int, torch.Tensor] = {}  # the weights over 1/tokens, per token count seen

            def mean_ramp(h: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
                if w is not None:
                    return torch.addmm(b, torch.bmm(w, h).squeeze(1), wt)
                t = h.shape[1]
                ws = scaled.get(t)
                if ws is None:
                    ws = scaled[t] = (wt / t).contiguous()
                return torch.addmm(b, h.sum(1), ws)
            return mean_ramp
        return lambda h, w: torch.addmm(b, h[:, 0], wt)  # cls

    def fast_with_sums(self) -> "Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None":
        """For a `pool` ramp over a feature map, `fast` that also returns the spatial sums it pools
        ([B, C]): the learned exit rule's difference detector reads them (`pooled_features`, the
        same op on the same tensor), so a server pays no second pooling. None for other ramps."""
        if self.spec.kind != "pool" or len(self.spec.in_shape) != 3:
            return None
        b, ws = self.head.bias.detach(), self._pool_weights()

        def pool_ramp(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            s = h.sum((2, 3))
            return torch.addmm(b, s, ws), s
        return pool_ramp

    def _pool_weights(self) -> torch.Tensor:
        """A `pool` ramp's head weights over the map's area, transposed: a sum times these is
        the head on the mean (a copy: fast functions are rebuilt when weights change)."""
        area = self.spec.in_shape[1] * self.spec.in_shape[2]
        return (self.head.weight.detach().t() / area).contiguous()

    @property
    def needs_token_weights(self) -> bool:
        return self.spec.kind == "mean"


FastRamp = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def token_weights(mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B, 1, T] weights of a masked mean over tokens, or None when every token counts (a plain
    mean is then the same and cheaper)."""
    if mask is None or bool(mask.all()):
        return None
    m = mask.to(torch.float32)
    return (m / m.sum(dim=1, keepdim=True).clamp_min(1.0)).unsqueeze(1)


def build_ramps(specs: list[RampSpec]) -> nn.ModuleList:
    return nn.ModuleList(Ramp(s) for s in specs)


# ---------------------------------------------------------------------------------------------
# Confidence: a score in [0, 1]; an input exits when 1 - confidence < threshold.

def max_softmax(probs: torch.Tensor) -> torch.Tensor:
    return probs.max(dim=-1).values


def margin(probs: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 probability."""
    top = probs.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """1 - entropy / log(classes): 1 for a one-hot answer, 0 for a uniform one."""
    p = probs.clamp_min(1e-12)
    h = -(probs * p.log()).sum(dim=-1)
    return 1.0 - h / torch.log(torch.tensor(float(probs.shape[-1]), dtype=probs.dtype))


CONFIDENCES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "max_softmax": max_softmax,
    "margin": margin,
    "entropy": entropy,
}

ConfidenceFn = Callable[[torch.Tensor], torch.Tensor]


def confidence_fn(kind: str | ConfidenceFn) -> ConfidenceFn:
    """A named confidence ('max_softmax', 'margin', 'entropy') or your own probs -> [B] function."""
    if callable(kind):
        return kind
    name = str(kind).replace("-", "_")
    if name not in CONFIDENCES:
        raise ValueError(f"unknown confidence {kind!r}; choose one of {', '.join(CONFIDENCES)}")
    return CONFIDENCES[name]


def score(logits: torch.Tensor, fn: ConfidenceFn) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence in [0, 1], predicted class) from ramp logits."""
    probs = torch.softmax(logits.float(), dim=-1)
    conf = fn(probs).clamp(0.0, 1.0)  # float rounding must not leave [0, 1]
    return conf, logits.argmax(dim=-1)  # from logits: softmax can round near-ties to equal


Scorer = Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]]


def scorer(fn: ConfidenceFn) -> Scorer:
    """logits -> (confidence [B] float64, class [B] int64), for the hot path: numpy arrays, or
    one-element tuples of Python numbers for a batch of one.

    Max softmax is read from the logits on the host without a softmax: 1 / sum(exp(l - max)),
    for two classes the logistic of the logit gap. A batch of one is scored in plain Python
    floats (inside the model a numpy call costs ~10 us there, several times its work), larger
    ones with numpy; on the CPU `.numpy()` and `.tolist()` read the logits in place, the one
    host transfer of a ramp. Other confidences go through `score`."""
    if fn is max_softmax:
        def fast(logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
            if logits.device.type != "cpu":
                logits = logits.cpu()
            if logits.shape[0] == 1:  # one-element tuples: making arrays costs more than the math here
                row = logits.tolist()[0]
                if len(row) == 2:
                    d = row[1] - row[0]
                    return (1.0 / (1.0 + math.exp(-abs(d))),), (int(d > 0),)  # type: ignore[return-value]
                top = max(row)
                return (1.0 / sum(math.exp(v - top) for v in row),), (row.index(top),)  # type: ignore[return-value]
            x = logits.numpy().astype(np.float64)
            if x.shape[1] == 2:
                d = x[:, 1] - x[:, 0]
                return 1.0 / (1.0 + np.exp(-np.abs(d))), (d > 0).astype(np.int64)
            top = x.max(axis=1, keepdims=True)
            return 1.0 / np.exp(x - top).sum(axis=1), x.argmax(axis=1)
        return fast

    def general(logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        conf, pred = score(logits, fn)
        return conf.cpu().numpy().astype(np.float64), pred.cpu().numpy()
    return general
