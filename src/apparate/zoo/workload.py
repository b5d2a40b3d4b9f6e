"""Workload and Stream: a ready model with its input encoding, and ordered inputs to serve.

A `Stream` yields `StreamItem`s: the raw input (a uint8 image tensor [3, H, W] or a text), its
ground-truth label in the workload's target label space (-1 where unknown) and its cost key (1
for fixed-size images, the token count for text). A `Workload` turns raw inputs into model
inputs (`encode`), names its streams, and carries what the preparation needs (label map, ramp
kind, site names for models fx cannot trace, sequence-length buckets to profile).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from apparate.model.batching import batch_maker, encode_batches
from apparate.model.training import Batch


@dataclass(frozen=True)
class StreamItem:
    input: Any  # uint8 tensor [3, H, W] or str
    label: int  # -1 where unknown
    cost: int = 1  # token length for text; 1 for fixed-size inputs


@dataclass
class Stream:
    """Inputs in serving order, with labels and cost keys; `meta` holds per-item extras."""

    name: str
    inputs: Sequence[Any]  # np.ndarray [N, H, W, 3] uint8 for images, or list[str]
    labels: np.ndarray
    costs: np.ndarray
    description: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. "phase": np.ndarray [N]

    def __post_init__(self) -> None:
        n = len(self.inputs)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.costs = np.asarray(self.costs, dtype=np.int64).reshape(-1)
        if self.labels.shape != (n,) or self.costs.shape != (n,):
            raise ValueError(f"stream {self.name!r}: {n} inputs, {self.labels.size} labels, {self.costs.size} costs")

    def __len__(self) -> int:
        return len(self.inputs)

    def item(self, i: int) -> StreamItem:
        x = self.inputs[i]
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))
        return StreamItem(x, int(self.labels[i]), int(self.costs[i]))

    def __iter__(self) -> Iterator[StreamItem]:
        for i in range(len(self)):
            yield self.item(i)

    def take(self, index: Any) -> "Stream":
        """A sub-stream: a slice, index array or mask (per-item meta arrays follow)."""
        idx = np.arange(len(self))[index]
        inputs = self.inputs[idx] if isinstance(self.inputs, np.ndarray) else [self.inputs[i] for i in idx]
        meta = {k: (v[idx] if isinstance(v, np.ndarray) and v.shape[:1] == (len(self),) else v) for k, v in self.meta.items()}
        return Stream(self.name, inputs, self.labels[idx], self.costs[idx], self.description, meta)

    def map_labels(self, label_map: Sequence[int] | None) -> "Stream":
        if label_map is None:
            return self
        lm = np.asarray(label_map)
        labels = np.where(self.labels >= 0, lm[np.clip(self.labels, 0, None)], -1)
        return Stream(self.name, self.inputs, labels, self.costs, self.description, dict(self.meta))


@dataclass
class Workload:
    name: str
    kind: str  # "image" or "text"
    model: nn.Module  # the untouched backbone, eval mode; called as model(x) or model(**x)
    encode: Callable[[Sequence[Any]], Any]  # raw inputs -> model inputs
    num_classes: int  # of the target (after label_map)
    class_names: tuple[str, ...]
    streams: Mapping[str, Callable[..., Stream]]  # name -> factory(seed=..., **kw)
    bootstrap_stream: str
    default_ramp: str
    label_map: tuple[int, ...] | None = None
    site_names: list[str] | None = None  # None: discover
    profile_lengths: tuple[int, ...] | None = None  # token buckets for text
    bootstrap_size: int | None = None  # bootstrap inputs when preparing (None: the kind's default)
    source: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    info: dict[str, Any] = field(default_factory=dict)  # e.g. the sentiment model's dev accuracy
    frame_size: tuple[int, int] | None = None  # (H, W) video frames are decoded at; None: the bootstrap's

    def stream(self, name: str, seed: int = 0, **kw: Any) -> Stream:
        if name not in self.streams:
            raise ValueError(f"workload {self.name!r} has no stream {name!r}; streams: {', '.join(self.streams)}")
        return self.streams[name](seed=seed, **kw)

    def batches(self, stream: Stream, batch_size: int = 128) -> Iterator[Batch]:
        """Model-ready batches of a stream, in order."""
        return encode_batches(stream, self.encode, batch_size)

    def batch_maker(self, stream: Stream) -> Callable[[int, int | None], Any]:
        """(batch size, length) -> model input of real inputs, for the profiler."""
        return batch_maker(stream, self.encode, self.kind == "text")
