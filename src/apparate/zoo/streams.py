"""Streams over the zoo's data: CIFAR-10 (in order, bootstrap samples, a drifting camera day) and
sentiment text (SST-2, Rotten Tomatoes, a drifting mix of short phrases and long reviews).

Every stream is deterministic given its seed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from apparate.zoo import conditions
from apparate.zoo.cifar10 import CLASSES, load_split
from apparate.zoo.workload import Stream

PathLike = str | os.PathLike | None


# ------------------------------------------------------------------------------------ CIFAR-10

def cifar_test(data_dir: PathLike, seed: int = 0, n: int | None = None) -> Stream:
    """The 10,000 test images in a fixed order.

    The tarball groups files by class, so "in order" is a fixed permutation (seed 0 unless
    asked otherwise): a class-sorted stream would be a pathological drift, not a test set.
    """
    s = load_split(data_dir, "test")
    order = np.random.default_rng(seed).permutation(len(s))[: n or len(s)]
    return Stream("test", s.images[order], s.labels[order], np.ones(len(order)),
                  f"CIFAR-10 test set, fixed order (seed {seed})", {"index": order})


def cifar_train(data_dir: PathLike, seed: int = 0, n: int | None = 5000) -> Stream:
    """A seeded sample of the training split: the default bootstrap data (disjoint from test)."""
    s = load_split(data_dir, "train")
    order = np.random.default_rng(seed + 1).permutation(len(s))[: n or len(s)]
    return Stream("train", s.images[order], s.labels[order], np.ones(len(order)),
                  f"CIFAR-10 train sample of {len(order)} (seed {seed})", {"index": order})


@dataclass(frozen=True)
class Phase:
    name: str
    share: float  # of the stream's length
    class_weights: dict[str, float]  # unnamed classes weigh 1
    settings: dict[str, float]  # image conditions at full severity


VEH = {"airplane": 1.0, "automobile": 4.0, "ship": 0.5, "truck": 4.0}
ANIMALS = {"bird": 3.0, "cat": 2.0, "deer": 2.0, "dog": 3.0, "frog": 1.0, "horse": 2.0}

CAMERA_DAY = (
    Phase("night", 0.10, {**VEH, "automobile": 2.0}, {"brightness": -0.30, "contrast": 0.45, "noise": 0.08}),
    Phase("dawn", 0.10, dict(VEH), {"brightness": -0.15, "contrast": 0.7, "noise": 0.04}),
    Phase("morning rush", 0.15, {**VEH, "automobile": 6.0, "truck": 6.0}, {}),
    Phase("midday", 0.15, {}, {"brightness": 0.12, "contrast": 1.15}),
    Phase("afternoon fog", 0.15, dict(ANIMALS), {"fog": 0.55, "contrast": 0.8}),
    Phase("rain", 0.15, {**VEH, **ANIMALS}, {"blur": 1.0, "contrast": 0.75, "noise": 0.03}),
    Phase("dusk", 0.10, {**VEH, "automobile": 5.0}, {"brightness": -0.2, "contrast": 0.6}),
    Phase("night again", 0.10, dict(VEH), {"brightness": -0.30, "contrast": 0.45, "noise": 0.08}),
)


# Abrupt switches: two very different scenes, alternating in blocks with nothing in between
# (a camera cut to another view, or a feed that changes source), three times each.
_CLEAR = Phase("clear, traffic", 1.0, {**VEH, "automobile": 6.0, "truck": 6.0}, {"brightness": 0.05, "contrast": 1.1})
_MURK = Phase("night fog, animals", 1.0, dict(ANIMALS), {"brightness": -0.25, "contrast": 0.5, "fog": 0.5,
                                                          "noise": 0.06})
SWITCH = (_CLEAR, _MURK) * 3


def switching_day(data_dir: PathLike, seed: int = 0, n: int = 6000) -> Stream:
    """Abrupt drift: a clear scene of traffic and a foggy night of animals alternate in six equal
    blocks, the mix and the conditions switching at once at each boundary."""
    s = camera_day(data_dir, seed, n, SWITCH)
    return Stream("switch", s.inputs, s.labels, s.costs, f"abrupt switches between two scenes, 6 blocks (seed {seed})",
                  s.meta)


def camera_day(data_dir: PathLike, seed: int = 0, n: int = 6000, phases: Sequence[Phase] = CAMERA_DAY) -> Stream:
    """A day seen by a street camera: phases change the class mix and the image conditions.

    Images come from the test split (drawn without replacement while it lasts), and each
    image's condition severity is jittered around its phase's (x0.7..1.3). `meta["phase"]` says
    which phase each item belongs to, `meta["phases"]` names them.
    """
    if n < len(phases):
        raise ValueError(f"a camera day needs at least {len(phases)} images, got {n}")
    s = load_split(data_dir, "test")
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    shares = np.array([p.share for p in phases], dtype=float)
    counts = np.floor(shares / shares.sum() * n).astype(int)
    counts[-1] += n - counts.sum()
    by_class = [list(rng.permutation(np.flatnonzero(s.labels == c))) for c in range(len(CLASSES))]
    imgs, labels, phase_ids, severity = [], [], [], []
    for pi, (ph, k) in enumerate(zip(phases, counts)):
        w = np.array([ph.class_weights.get(c, 1.0) for c in CLASSES], dtype=float)
        cls = rng.choice(len(CLASSES), size=k, p=w / w.sum())
        idx = []
        for c in cls:
            if not by_class[c]:  # reuse images once a class is exhausted
                by_class[c] = list(rng.permutation(np.flatnonzero(s.labels == c)))
            idx.append(by_class[c].pop())
        idx = np.asarray(idx)
        batch = torch.from_numpy(s.images[idx]).permute(0, 3, 1, 2)
        jitter = rng.uniform(0.7, 1.3, size=k)
        out = []
        for j in range(k):  # per-image severity
            st = {name: _scale(name, v, jitter[j]) for name, v in ph.settings.items()}
            out.append(conditions.apply(batch[j:j + 1], st, gen) if st else batch[j:j + 1])
        imgs.append(torch.cat(out).permute(0, 2, 3, 1).numpy() if out else np.zeros((0, 32, 32, 3), np.uint8))
        labels.append(s.labels[idx])
        phase_ids.append(np.full(k, pi))
        severity.append(jitter)
    return Stream("camera-day", np.concatenate(imgs), np.concatenate(labels), np.ones(n),
                  f"drifting camera day, {len(phases)} phases (seed {seed})",
                  {"phase": np.concatenate(phase_ids), "phases": [p.name for p in phases],
                   "severity": np.concatenate(severity)})


def _scale(name: str, value: float, f: float) -> float:
    """Scale a condition's severity: contrast is a factor around 1, the rest scale from 0."""
    if name == "contrast":
        return 1.0 + (value - 1.0) * f
    return value * f


# ------------------------------------------------------------------------------------ text

def text_stream(name: str, texts: Sequence[str], labels: Sequence[int], cost: Callable[[Sequence[str]], np.ndarray],
                description: str, meta: dict[str, Any] | None = None) -> Stream:
    return Stream(name, list(texts), np.asarray(labels), cost(texts), description, meta or {})


def drifting_text(short: Sequence[tuple[str, int]], long: Sequence[tuple[str, int]], cost: Callable[[Sequence[str]], np.ndarray],
                  seed: int = 0, n: int = 3000, names: tuple[str, str] = ("short phrases", "long reviews"),
                  blocks: int = 3, name: str = "drift") -> Stream:
    """Short texts, then long ones, alternating in `blocks` equal blocks (3: short, long, short)."""
    rng = np.random.default_rng(seed)
    k = [n // blocks] * (blocks - 1) + [n - (blocks - 1) * (n // blocks)]
    s_idx = list(rng.permutation(len(short)))
    l_idx = list(rng.permutation(len(long)))
    parts = []
    for b, size in enumerate(k):
        src, idx = (short, s_idx) if b % 2 == 0 else (long, l_idx)
        take, idx[:] = idx[:size], idx[size:]
        parts.append([src[i] for i in take])
    items = [x for p in parts for x in p]
    phase = np.concatenate([np.full(len(p), i) for i, p in enumerate(parts)])
    label = [names[b % 2] for b in range(blocks)]
    return text_stream(name, [t for t, _ in items], [lab for _, lab in items], cost,
                       f"{'drifting' if blocks == 3 else 'abruptly switching'} text: {', '.join(label)} (seed {seed})",
                       {"phase": phase, "phases": label})
