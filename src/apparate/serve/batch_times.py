"""What the engine's batches cost, with contention kept out of the profile.

With one torch thread a batch's compute runs on the engine thread, so that thread's CPU time is
what the batch costs; the wall time on top of it is waiting: for the GIL while the event loop
parses requests (between every two torch ops), or for a core another process holds. Under
overload that doubled a ResNet-20 batch here. Each batch's measured stage times are therefore
scaled by CPU / wall (`scale_times`) before they reach the profile (what the controller weighs
ramps with, and what is checkpointed). How much longer batches take than that profile predicts
is tracked separately (`BatchTimes`), over the last 64 batches: the median (the engine's
`slowdown`) multiplies what the batcher predicts, the 90th percentile (`margin`) what admission
promises. Queueing for the interpreter then shows as what it is, a transient load, instead of
inflating the model's costs.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .report import BatchReport


class BatchTimes:
    """Wall time of the latest batches over what the profile predicts for them."""

    def __init__(self, quantile: float, size: int = 64):
        self.quantile = quantile  # admission's quantile (the batcher uses the median)
        self._walls = np.zeros((size, 3))  # wall ms, batch size, padded length of the latest batches
        self._n_ratios = 0

    def observe(self, wall_ms: float, size: int, length: float | None,
                costs: Callable[[], Any]) -> tuple[float, float] | None:
        """Record a batch's wall time; return the median and the `quantile`, over the latest
        batches, of wall time / what the profile predicts now for a batch of that shape (None
        when they are not recomputed this time). Against the current profile (`costs()`, the
        latest `BatchCosts`, which may be newer than the batch's), not the one in force then:
        the profile moves (toward the measured costs) and an old ratio would no longer fit it."""
        k = self._n_ratios % self._walls.shape[0]
        self._walls[k] = (wall_ms, size, 1.0 if length is None else length)
        self._n_ratios += 1
        # On the batch's critical path: recomputed every few batches once warm (these are
        # quantiles over 64 batches; np.quantile alone cost 1% of a ResNet-56 batch of 8).
        if self._n_ratios > 16 and self._n_ratios % 4:
            return None
        w = self._walls[: min(self._n_ratios, self._walls.shape[0])]
        c = costs()
        rows = np.clip(w[:, 2].astype(np.int64), 1, c.table.shape[0]) - 1
        cols = np.clip(w[:, 1].astype(np.int64), 1, c.table.shape[1]) - 1
        ratios = np.sort(w[:, 0] / np.maximum(c.table[rows, cols] + c.overhead_ms, 1e-6))
        return quantile_sorted(ratios, 0.5), quantile_sorted(ratios, self.quantile)


def on_cpu(model: Any) -> bool:
    """Whether every parameter of `model` is on the CPU (its batches' cost is then CPU time)."""
    try:
        return all(p.device.type == "cpu" for p in model.parameters())
    except (AttributeError, TypeError):
        return False


def quantile_sorted(sorted_values: np.ndarray, q: float) -> float:
    """np.quantile's default (linear) on values already sorted, without its overhead."""
    pos = q * (sorted_values.size - 1)
    lo = int(pos)
    hi = min(lo + 1, sorted_values.size - 1)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


def scale_times(report: BatchReport, share: float) -> None:
    """A batch's measured stage times with the waiting taken out: each scaled by the share of
    the batch's wall time that the engine thread was running (its CPU time / wall time).
    Assumes the waiting spread evenly over the batch, as GIL hand-overs between ops do."""
    if share >= 1.0:
        return
    report.site_ms = {k: v * share for k, v in report.site_ms.items()}
    report.ramp_ms = {k: v * share for k, v in report.ramp_ms.items()}
    if report.vanilla_ms is not None:
        report.vanilla_ms *= share
    report.total_ms *= share
    report.overhead_ms *= share
