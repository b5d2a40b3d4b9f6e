"""Recording: every candidate ramp's output on a stream of inputs, in arrival order.

Made once by running a model with all candidate ramps active; used for initial placement
(bootstrap data) and replayed through any policy. Stored as one `.npz` of plain arrays (loaded
with pickles disallowed) whose `meta` entry is UTF-8 JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "apparate.recording/1"


@dataclass(frozen=True, eq=False)
class Recording:
    conf: np.ndarray  # [N, S] confidence of each candidate ramp, in [0, 1]
    pred: np.ndarray  # [N, S] each ramp's predicted class
    final: np.ndarray  # [N] the original model's predicted class
    labels: np.ndarray | None = None  # [N] ground truth, -1 where unknown
    lengths: np.ndarray | None = None  # [N] cost key (e.g. tokens); None for fixed-size inputs
    site_names: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)
    move: np.ndarray | None = None  # [N, S] how far each site's pooled features moved since the
    # previous input of the stream (relative L2 change; NaN where unknown); None: not recorded
    features: tuple[np.ndarray, ...] | None = None  # per site [N, D_s] float16: what its linear
    # head reads (the ramp's reduction); with `heads`, what heads that keep learning need (core.heads)
    heads: tuple[tuple[np.ndarray, np.ndarray], ...] | None = None  # per site the recorded head (W [K, D_s], b [K])

    def __post_init__(self) -> None:
        conf = np.asarray(self.conf, dtype=np.float32)
        pred = np.asarray(self.pred, dtype=np.int32)
        final = np.asarray(self.final, dtype=np.int32).reshape(-1)
        if conf.ndim != 2 or pred.shape != conf.shape:
            raise ValueError(f"conf and pred must both be [inputs, sites], got {conf.shape} and {pred.shape}")
        n = conf.shape[0]
        if final.shape != (n,):
            raise ValueError(f"final has {final.size} entries for {n} inputs")
        if np.isnan(conf).any() or (conf.size and (conf.min() < 0 or conf.max() > 1)):
            raise ValueError("conf must be finite and in [0, 1]")
        labels = None if self.labels is None else np.asarray(self.labels, dtype=np.int32).reshape(-1)
        lengths = None if self.lengths is None else np.asarray(self.lengths, dtype=np.int32).reshape(-1)
        for name, arr in (("labels", labels), ("lengths", lengths)):
            if arr is not None and arr.shape != (n,):
                raise ValueError(f"{name} has {arr.size} entries for {n} inputs")
        move = None if self.move is None else np.asarray(self.move, dtype=np.float32)
        if move is not None and move.shape != conf.shape:
            raise ValueError(f"move must be [inputs, sites] like conf, got {move.shape}")
        feats, heads = self._features(n, conf.shape[1])
        names = tuple(self.site_names)
        if names and len(names) != conf.shape[1]:
            raise ValueError(f"{len(names)} site names for {conf.shape[1]} sites")
        for attr, value in (("conf", conf), ("pred", pred), ("final", final), ("labels", labels),
                            ("lengths", lengths), ("site_names", names), ("meta", dict(self.meta)), ("move", move),
                            ("features", feats), ("heads", heads)):
            object.__setattr__(self, attr, value)

    def _features(self, n: int, S: int) -> tuple[Any, Any]:
        if (self.features is None) != (self.heads is None):
            raise ValueError("features and heads come together (heads that keep learning need both)")
        if self.features is None:
            return None, None
        feats = tuple(np.asarray(f, dtype=np.float16) for f in self.features)
        heads = tuple((np.asarray(w, np.float32), np.asarray(b, np.float32)) for w, b in self.heads)
        if len(feats) != S or len(heads) != S:
            raise ValueError(f"features and heads must be given for all {S} sites")
        for s, (f, (w, b)) in enumerate(zip(feats, heads)):
            if f.ndim != 2 or f.shape[0] != n or w.ndim != 2 or w.shape[1] != f.shape[1] or b.shape != (w.shape[0],):
                raise ValueError(f"site {s}: features {f.shape} do not fit head {w.shape}, {b.shape} for {n} inputs")
        return feats, heads

    @property
    def num_inputs(self) -> int:
        return int(self.conf.shape[0])

    @property
    def num_sites(self) -> int:
        return int(self.conf.shape[1])

    @property
    def agree(self) -> np.ndarray:
        """[N, S]: each ramp's answer equals the original model's."""
        return self.pred == self.final[:, None]

    def __len__(self) -> int:
        return self.num_inputs

    def take(self, index: Any) -> "Recording":
        """A recording of a subset of the inputs (a slice, mask or index array)."""
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        feats = None if self.features is None else tuple(f[index] for f in self.features)
        return Recording(self.conf[index], self.pred[index], self.final[index], pick(self.labels),
                         pick(self.lengths), self.site_names, self.meta, pick(self.move), feats, self.heads)

    def with_answers(self, conf: np.ndarray, pred: np.ndarray, **meta: Any) -> "Recording":
        """The same stream with other ramp answers (e.g. from heads that keep learning)."""
        return Recording(conf, pred, self.final, self.labels, self.lengths, self.site_names,
                         {**self.meta, **meta}, self.move, self.features, self.heads)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(".npz")
        arrays = {"conf": self.conf, "pred": self.pred, "final": self.final}
        if self.labels is not None:
            arrays["labels"] = self.labels
        if self.lengths is not None:
            arrays["lengths"] = self.lengths
        if self.move is not None:
            arrays["move"] = self.move
        for s, f in enumerate(self.features or ()):
            arrays[f"feat{s}"], arrays[f"headw{s}"], arrays[f"headb{s}"] = f, *self.heads[s]
        meta = {"format": FORMAT, "site_names": list(self.site_names), "meta": self.meta}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Recording":
        path = Path(path)
        if not path.exists():
            raise ValueError(f"no recording at {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except Exception as e:  # a truncated or foreign file
            raise ValueError(f"{path} is not a readable recording: {e}") from None
        try:
            meta = json.loads(bytes(data["meta"]).decode())
        except (KeyError, ValueError):
            raise ValueError(f"{path} has no recording metadata") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a recording of format {FORMAT!r}: {meta.get('format')!r}")
        missing = {"conf", "pred", "final"} - set(data)
        if missing:
            raise ValueError(f"{path} lacks {sorted(missing)}")
        S = data["conf"].shape[1] if data["conf"].ndim == 2 else 0
        feats = heads = None
        if "feat0" in data:
            feats = tuple(data.get(f"feat{s}") for s in range(S))
            heads = tuple((data.get(f"headw{s}"), data.get(f"headb{s}")) for s in range(S))
            if any(f is None for f in feats) or any(w is None or b is None for w, b in heads):
                raise ValueError(f"{path} has features or heads for only some sites")
        return cls(data["conf"], data["pred"], data["final"], data.get("labels"), data.get("lengths"),
                   tuple(meta.get("site_names", ())), meta.get("meta", {}), data.get("move"), feats, heads)
