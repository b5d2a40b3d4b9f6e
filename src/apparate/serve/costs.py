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


def end_ms_grid(profile: LatencyProfile, sites: Sequence[int], batch_sizes: np.ndarray,
                lengths: np.ndarray | None) -> np.ndarray:
    """[len(lengths) or 1, len(batch_sizes)]: the non-exit latency (vanilla + active ramps)."""
    return profile.end_ms_grid(sites, batch_sizes, lengths)


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

    def exec_ms(self, costs: np.ndarray, scale: float = 1.0) -> Callable[[int], float]:
        """exec_ms(b) for the batcher: a batch of the b oldest queued requests (text pads to the
        longest of them). `scale` multiplies every prediction (the engine's measured slowdown)."""
        table, over = self.table, self.overhead_ms
        if table.shape[0] == 1 or costs.size == 0:
            row = table[0]
            if scale == 1.0:
                return lambda b: float(row[min(b, row.size) - 1]) + over
            return lambda b: (float(row[min(b, row.size) - 1]) + over) * scale
        longest = np.maximum.accumulate(np.clip(costs, 1, table.shape[0]))

        def f(b: int) -> float:
            return (float(table[longest[min(b, longest.size) - 1] - 1, min(b, table.shape[1]) - 1]) + over) * scale
        return f

    def drain_ms(self, count: int, costs: np.ndarray | None = None) -> float:
        """Predicted time to serve `count` queued inputs in arrival order, in batches as full as
        the max batch allows (how a work-conserving batcher drains a backlog): the finish time,
        from the moment the worker is free, of the last of them. `costs` (text: each input's
        token count, oldest first) pads each batch to its longest; None for fixed-size inputs.

        This is what admission compares with a request's deadline, the request's own inputs
        being the last `n` of `count`. For images it is exact whenever the profile is; for text
        it assumes the queued inputs are batched in arrival order, as Clockwork batches them."""
        if count <= 0:
            return 0.0
        table, over, mb = self.table, self.overhead_ms, self.table.shape[1]
        full, rest = divmod(int(count), mb)
        if table.shape[0] == 1 or costs is None:
            row = table[0]
            return full * (float(row[mb - 1]) + over) + (float(row[rest - 1]) + over if rest else 0.0)
        c = np.clip(np.asarray(costs, dtype=np.int64)[-int(count):], 1, table.shape[0])
        if full:
            longest = c[: full * mb].reshape(full, mb).max(axis=1)
            ms = float(table[longest - 1, mb - 1].sum()) + full * over
        else:
            ms = 0.0
        if rest:
            ms += float(table[int(c[full * mb:].max()) - 1, rest - 1]) + over
        return ms

