"""Record a stream once: every candidate ramp's confidence and answer, the original answer, the
label and the cost key, per input in arrival order. Replays of any policy then need no model.

A recording carries its bundle's identity (a hash of the bundle's manifest), so that a replay
refuses a recording made by another bundle.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from apparate.core.evidence import movement
from apparate.core.recording import Recording


def bundle_id(bundle_path: str | Path) -> str:
    """Identity of a bundle: the hash of its manifest (a re-prepared bundle gets a new one)."""
    from apparate.model.bundle import MANIFEST

    data = (Path(bundle_path) / MANIFEST).read_bytes()
    return hashlib.sha256(data).hexdigest()[:16]


def record_stream(bundle: Any, stream: Any, batch_size: int = 64, progress: bool = True,
                  threads: int | None = None, move: bool = True, features: bool = False) -> Recording:
    """Run `bundle`'s model over `stream` with every candidate ramp active; `move`: also how far
    each site's pooled features moved since the previous input (image streams); `features`: also
    what each ramp's linear head reads, and the heads, for heads that keep learning (`core.heads`)."""
    import torch
    from tqdm import tqdm

    if bundle.workload is None:
        raise ValueError("recording a stream needs the bundle's workload (a zoo or Hugging Face bundle)")
    if threads:
        torch.set_num_threads(threads)
    from apparate.devices import device_of, to_device

    model = bundle.early_exit_model()  # on the device the bundle was loaded onto (`load_bundle(device=)`)
    device = device_of(model)
    sites = tuple(range(bundle.num_sites))
    conf, pred, final, labels, costs, moves = [], [], [], [], [], []
    n = len(stream)
    tracker = _MoveTracker(model) if move and bundle.workload.kind == "image" else None
    taps = _FeatureTaps(model) if features else None
    with tqdm(total=n, desc=f"record {stream.name}", unit="input", disable=not progress) as bar:
        for batch in bundle.workload.batches(stream, batch_size):
            if tracker is not None:
                tracker.start()
            out = model(to_device(batch.inputs, device), active=sites)
            if tracker is not None:
                moves.append(tracker.finish())
            if taps is not None:
                taps.finish()
            conf.append(out.conf_matrix(sites).astype(np.float32))
            pred.append(out.pred_matrix(sites))
            final.append(out.final_pred.cpu().numpy())
            labels.append(np.asarray(batch.labels))
            costs.append(np.asarray(batch.costs if batch.costs is not None else np.ones(len(batch.labels))))
            bar.update(len(batch.labels))
    lengths = np.concatenate(costs) if bundle.workload.kind == "text" else None
    meta = {
        "bundle_id": bundle_id(bundle.path),
        "bundle": str(bundle.path),
        "workload": bundle.workload.name,
        "stream": stream.name,
        "inputs": n,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for key, value in stream.meta.items():  # per-input extras such as a drifting stream's phase
        if isinstance(value, np.ndarray) and value.shape[:1] == (n,) and value.dtype.kind in "iuf":
            meta[f"per_input_{key}"] = value.tolist()
    if tracker is not None:
        tracker.close()
    feats, heads = taps.close() if taps is not None else (None, None)
    return Recording(np.clip(np.concatenate(conf), 0.0, 1.0), np.concatenate(pred), np.concatenate(final),
                     np.concatenate(labels), lengths, tuple(s.name for s in bundle.sites), meta,
                     np.concatenate(moves) if moves else None, feats, heads)


class _FeatureTaps:
    """Each ramp swapped for a module that keeps its reduction's output (what the linear head
    reads) and answers as the ramp does; restored on `close`. Only linear heads
    (`model.ramp_results.linear_head`: `pool`, `mean`, `cls` ramps) are retrained without the
    model, as a server does, so other kinds are refused."""

    def __init__(self, model: Any) -> None:
        from apparate.model.ramp_results import linear_head

        self.model, self.ramps = model, list(model.ramps)
        bad = [s for s, r in enumerate(self.ramps) if not linear_head(r)]
        if bad:
            raise ValueError(f"recording features needs linear ramp heads (pool, mean, cls); sites {bad} have others")
        self.rows: list[list[np.ndarray]] = [[] for _ in self.ramps]
        self.cur: list[Any] = [None] * len(self.ramps)
        for s, r in enumerate(self.ramps):
            model.set_ramp(s, _tap(r, self.cur, s))

    def finish(self) -> None:
        for s, f in enumerate(self.cur):
            if f is None:
                raise RuntimeError(f"site {s} did not run while recording")
            self.rows[s].append(f.astype(np.float16))
        self.cur[:] = [None] * len(self.cur)

    def close(self) -> tuple[tuple[np.ndarray, ...], tuple[tuple[np.ndarray, np.ndarray], ...]]:
        for s, r in enumerate(self.ramps):
            self.model.set_ramp(s, r)
        heads = tuple((r.head.weight.detach().float().cpu().numpy().copy(), r.head.bias.detach().float().cpu().numpy().copy())
                      for r in self.ramps)
        return tuple(np.concatenate(rows) for rows in self.rows), heads


def _tap(ramp: Any, store: list, site: int) -> Any:
    from torch import nn

    class Tap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = ramp

        def forward(self, h: Any, mask: Any = None) -> Any:
            z = self.inner.reduce(h, mask)
            store[site] = z.detach().float().cpu().numpy()
            return self.inner.head(z)

    return Tap()


class _MoveTracker:
    """Per site, how far the site's pooled features moved from the previous input of the stream
    (|f_i - f_(i-1)| / |f_(i-1)|, f the spatial sum of the site's output): the difference detector
    of `core.evidence`, measured once at record time. Its own hooks beside the ramps' (the pooling is
    parameter-free and costs a fraction of a ramp). A live server computes the same
    (`core.evidence.movement` on the sums `EarlyExitModel` gives its ramps' results on request)."""

    def __init__(self, model: Any) -> None:
        self.S = model.num_sites
        self.prev: list[Any] = [None] * self.S
        self.cur: list[Any] = [None] * self.S
        self.handles = [m.register_forward_hook(self._hook(s)) for s, m in enumerate(model.site_modules)]

    def _hook(self, s: int):
        from apparate.model.ramp_results import pooled_features
        from apparate.model.sites import primary_output

        def hook(_m: Any, _i: Any, output: Any) -> None:
            h = output if not isinstance(output, (tuple, list, dict)) else primary_output(output)
            self.cur[s] = pooled_features(h)
        return hook

    def start(self) -> None:
        self.cur = [None] * self.S

    def finish(self) -> np.ndarray:
        cols = []
        for s in range(self.S):
            f = self.cur[s]
            if f is None:
                raise RuntimeError(f"site {s} did not run while recording")
            cols.append(movement(f, self.prev[s]))
            self.prev[s] = f[-1:]
        return np.stack(cols, axis=1).astype(np.float32)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def check_recording_matches(recording: Recording, bundle_path: str | Path) -> None:
    """Refuse a recording made by a different bundle."""
    want = bundle_id(bundle_path)
    got = recording.meta.get("bundle_id")
    if got != want:
        raise ValueError(f"the recording was made by bundle {recording.meta.get('bundle', '?')} (id {got}), "
                         f"not by {bundle_path} (id {want}): record the stream again with this bundle")
