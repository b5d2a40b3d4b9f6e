"""Predicted batch execution time for the batcher, from the (online-updated) LatencyProfile.

The batcher asks `exec_ms(b)` many times per decision (Clockwork tries every batch size from
the largest down), so the prediction must cost next to nothing. `BatchCosts` precomputes, once
per profile or configuration change (in the controller thread, off the critical path), the
time of a batch of every size 1..max_batch (and, for text, every padded length 1..max_tokens)
with the active ramps included: `vanilla + sum(active ramp costs)`, interpolated exactly as
`LatencyProfile.at` does. It adds the engine's own measured per-batch overhead (encoding,
releases, bookkeeping) so deadlines are judged on what a batch really takes here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from apparate.core.profile import LatencyProfile


def _weights(grid: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised `apparate.core.profile._interp_weights`: (i, j, w) for every x."""
    grid = np.asarray(grid, dtype=np.float64)
    xs = np.asarray(xs, dtype=np.float64)
    n = grid.size
    if n == 1:
        z = np.zeros(xs.size, dtype=np.int64)
        return z, z, np.zeros(xs.size)
    j = np.clip(np.searchsorted(grid, xs), 1, n - 1)
    i = j - 1
    w = (xs - grid[i]) / (grid[j] - grid[i])
    below = xs <= grid[0]
    i, j, w = np.where(below, 0, i), np.where(below, 0, j), np.where(below, 0.0, w)
    return i, j, w


def end_ms_grid(profile: LatencyProfile, sites: Sequence[int], batch_sizes: np.ndarray,
                lengths: np.ndarray | None) -> np.ndarray:
    """[len(lengths) or 1, len(batch_sizes)]: the non-exit latency (vanilla + active ramps)."""
    sites = [int(s) for s in sites]
    ls = np.asarray(lengths if lengths is not None else [float(profile.lengths[0])], dtype=np.float64)
    li, lj, lw = _weights(profile.lengths, ls)
    bi, bj, bw = _weights(profile.batch_sizes, np.asarray(batch_sizes, dtype=np.float64))

    def blend(arr: np.ndarray) -> np.ndarray:  # arr [L, B, ...] -> [len(ls), len(bs), ...]
        by_len = (1 - lw)[(...,) + (None,) * (arr.ndim - 1)] * arr[li] + lw[(...,) + (None,) * (arr.ndim - 1)] * arr[lj]
        extra = (None,) * (arr.ndim - 2)
        return (1 - bw)[(None, slice(None)) + extra] * by_len[:, bi] + bw[(None, slice(None)) + extra] * by_len[:, bj]

    van = np.maximum(blend(profile.vanilla_ms), 1e-9)
    if sites:
        ramp = np.maximum(blend(profile.ramp_ms[..., sites]), 0.0).sum(axis=-1)
    else:
        ramp = np.zeros_like(van)
    return van + ramp


@dataclass(frozen=True, eq=False)
class BatchCosts:
    """Predicted ms of a batch by size (and padded length), active ramps and engine overhead."""

    sites: tuple[int, ...]
    table: np.ndarray  # [lengths, max_batch]: row l-1 for padded length l (one row for images)
    overhead_ms: float = 0.0

    @classmethod
    def build(cls, profile: LatencyProfile, sites: Sequence[int], max_batch: int, max_tokens: int | None = None,
              overhead_ms: float = 0.0) -> "BatchCosts":
        bs = np.arange(1, max_batch + 1)
        lengths = None if max_tokens is None else np.arange(1, max_tokens + 1)
        return cls(tuple(int(s) for s in sites), end_ms_grid(profile, sites, bs, lengths), float(overhead_ms))

    @property
    def max_batch(self) -> int:
        return int(self.table.shape[1])

    def batch_ms(self, b: int, length: int = 1) -> float:
        b = min(max(int(b), 1), self.max_batch)
        row = min(max(int(length), 1), self.table.shape[0]) - 1
        return float(self.table[row, b - 1]) + self.overhead_ms

    def exec_ms(self, costs: np.ndarray) -> Callable[[int], float]:
        """exec_ms(b) for the batcher: a batch of the b oldest queued requests (text pads to the
        longest of them)."""
        table, over = self.table, self.overhead_ms
        if table.shape[0] == 1 or costs.size == 0:
            row = table[0]
            return lambda b: float(row[min(b, row.size) - 1]) + over
        longest = np.maximum.accumulate(np.clip(costs, 1, table.shape[0]))

        def f(b: int) -> float:
            return float(table[longest[min(b, longest.size) - 1] - 1, min(b, table.shape[1]) - 1]) + over
        return f
