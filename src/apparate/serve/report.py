"""What one served batch tells the control thread (`BatchReport`), and the final output's confidence.

Per-input arrays are in the batch's order and cover every input. With early stop some inputs left
the batch's pass after their release: their later ramps and the model's final answer were never
computed, so `known` marks the rows whose agreement is known and only those count as feedback (each
with its `weight`, the inverse of the probability that it reached the end)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from apparate.core.types import exit_sites_of


@dataclass(eq=False)
class BatchReport:
    """One served batch, for the control thread (times in ms)."""

    sites: tuple[int, ...]
    thresholds: tuple[float, ...]
    version: int
    conf: np.ndarray  # [n, R] float64, R = len(sites): the ramps' confidences (learned: the scores served with)
    agree: np.ndarray  # [n, R] bool: the ramp's answer equals the final one (rows in `known` only)
    exit_pos: np.ndarray  # [n] index into sites of the releasing ramp; R = the final output
    released_agree: np.ndarray  # [n] bool: the answer each input got equals the final one (`known` rows)
    release_t: np.ndarray  # [n] perf_counter time each input was released
    batch_size: int
    length: float | None
    site_ms: dict[int, float] = field(default_factory=dict)  # cumulative backbone time, every site seen
    ramp_ms: dict[int, float] = field(default_factory=dict)  # active ramps' own cost
    vanilla_ms: float | None = None  # the whole backbone, ramps and releases excluded
    total_ms: float = 0.0  # batch taken from the queue -> every answer released
    overhead_ms: float = 0.0  # total minus backbone and ramps: encoding, releases, bookkeeping
    feedback: bool = True  # False when a ramp failed: nothing to learn from this batch
    arrivals: np.ndarray | None = None  # [n] perf_counter arrival times (set by the engine)
    t_start: float = 0.0  # batch taken from the queue (perf_counter s)
    t_end: float = 0.0  # every answer released
    # the learned exit rule only (a scorer was given): [n, R, F] features, [n, R] the ramps' own
    # confidences, and the version of the scorer the batch was served with
    features: np.ndarray | None = None
    ramp_conf: np.ndarray | None = None
    scorer_version: int | None = None
    # early stop (serve/early_stop.py): [n] rows that reached the final output (None: all), whose
    # agreement is known; [n] each such row's inverse sampling probability (None: all 1); rows that
    # left the batch's pass; whether every row left and the batch stopped before the model's end
    known: np.ndarray | None = None
    weight: np.ndarray | None = None
    left: int = 0
    stopped: bool = False

    @property
    def known_count(self) -> int:
        """Inputs whose agreement with the model's final answer is known (reached the end)."""
        return self.batch_size if self.known is None else int(np.count_nonzero(self.known))

    def known_rows(self, a: np.ndarray) -> np.ndarray:
        """`a`'s rows (a per-input array) for the inputs that reached the final output."""
        return a if self.known is None else a[self.known]

    def account(self, metrics: Any) -> None:
        """Record the batch in the metrics (exits, agreement, latencies, batch size)."""
        sites = exit_sites_of(tuple(self.sites))[self.exit_pos]
        arr = self.arrivals if self.arrivals is not None else np.full(self.batch_size, self.t_start)
        metrics.batch_done(sites, self.released_agree, (self.release_t - arr).tolist(), (self.t_start - arr).tolist(),
                           self.t_end - self.t_start, self.known)
        if self.left:
            metrics.early_stop(self.left, self.stopped)


def final_confidence(logits: Any, label_map: Any, num_classes: int) -> np.ndarray:
    """Max softmax of the model's own output, in the target label space (mapped classes summed).

    On the host, in numpy: on the engine thread every torch op gives the GIL up and may have to
    wait for it. (What this costs after a forward is mostly cold caches, not the ops: 156 us of CPU
    on the first call after a ResNet-56 forward, 15 us on a second.) `label_map`: [K] numpy class
    map or None."""
    import torch

    z = logits.detach().cpu()  # on a device: after the batch's last wait, so nothing left to wait for
    z = (z if z.dtype == torch.float32 else z.float()).numpy()
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    if label_map is not None:
        q = np.zeros((p.shape[0], num_classes), dtype=p.dtype)
        np.add.at(q, (slice(None), label_map), p)
        p = q
    return p.max(axis=-1)
