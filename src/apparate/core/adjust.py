"""Ramp utilities and the pieces of the latency-focused ramp adjustment.

A ramp pays for itself when the latency it saves the inputs it releases exceeds the latency it
adds to the inputs that pass it. With the active ramps' thresholds fixed, for ramp j:

    savings_j  = sum over inputs released at j of (L_next - L_j), where "next" is the next active
                 ramp at which that same input could also have exited, or the final output (A8)
    overhead_j = cost_j * (number of inputs that reach j and go on)
    utility_j  = (savings_j - overhead_j) / N          (ms per input)

The controller decides when to adjust; this module answers "what is each ramp worth", "which
sites may be active together" and "where to try next".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .exits import first_exit
from .profile import LatencyProfile, LatencyTable
from .settings import Settings


@dataclass(frozen=True, eq=False)
class UtilitySums:
    """Per-ramp savings and overhead (ms) over some inputs: summed ([R]) or per input ([N, R])."""

    savings: np.ndarray
    overhead: np.ndarray
    released: np.ndarray  # inputs released at each ramp
    inputs: int

    @property
    def utility(self) -> np.ndarray:
        """Mean utility per input, ms: [R]."""
        return (self.savings - self.overhead) / max(self.inputs, 1)


def utility_sums(conf: np.ndarray, thresholds: np.ndarray, table: LatencyTable, per_input: bool = False) -> UtilitySums:
    """Savings and overhead of each active ramp on a window; conf [N, R] in site order.
    With `per_input`, the [N, R] contributions are returned unsummed (to group by batch)."""
    n, R = conf.shape
    t = np.asarray(thresholds, dtype=np.float64)
    fires = (1.0 - conf) < t[None, :]
    exit_idx = first_exit(1.0 - conf, t)
    # next_fire[n, j]: first ramp after j where input n would also exit, else R (the end).
    idx = np.where(fires, np.arange(R)[None, :], R)
    after = np.minimum.accumulate(idx[:, ::-1], axis=1)[:, ::-1]  # first fire at >= j
    next_fire = np.concatenate([after[:, 1:], np.full((n, 1), R)], axis=1) if R else after
    lat = table.all_ms
    released = np.zeros((n, R), dtype=bool)
    if R:
        released[np.arange(n), np.minimum(exit_idx, R - 1)] = exit_idx < R
    saving = np.where(released, lat[next_fire] - lat[:R][None, :], 0.0)
    passes = exit_idx[:, None] > np.arange(R)[None, :]
    if per_input:
        return UtilitySums(savings=saving, overhead=passes * table.ramp_ms[None, :], released=released, inputs=n)
    return UtilitySums(
        savings=saving.sum(axis=0),
        overhead=passes.sum(axis=0) * table.ramp_ms,
        released=released.sum(axis=0),
        inputs=n,
    )


def ramp_utilities(conf: np.ndarray, thresholds: np.ndarray, table: LatencyTable) -> np.ndarray:
    """Mean utility (ms per input) of each active ramp on a window: [R]."""
    return utility_sums(conf, thresholds, table).utility


def latest_useful_site(profile: LatencyProfile, batch_size: float, length: float | None = None) -> int:
    """Deepest site where exiting (with only that ramp) still beats the bare model; -1 if none."""
    site, ramp, van = profile.at(batch_size, length)
    ok = np.flatnonzero(site + ramp < van)
    return int(ok[-1]) if ok.size else -1


BudgetPoint = tuple[float, float | None]  # (batch size, text length) where the budget is judged


def within_budget(sites: Sequence[int], profile: LatencyProfile, settings: Settings,
                  at: BudgetPoint | None = None, slack: float = 0.0) -> bool:
    """The ramp budget (overhead share for a non-exiting input at `at`, else the worst case over
    every profiled batch size), exceeded by at most `slack` of it, and the optional count cap."""
    if settings.max_ramps is not None and len(sites) > settings.max_ramps:
        return False
    b, length = at if at is not None else (None, None)
    return profile.overhead(sorted(sites), b, length) <= settings.ramp_budget * (1.0 + slack) + 1e-12


def deeper_site(previous: Sequence[int], latest: int) -> int | None:
    """Where to re-spend capacity when ramps stopped paying: the middle of the unexplored region
    past every ramp that was active, up to the latest useful site."""
    left = (max(previous) + 1) if previous else 0
    if left > latest:
        return None
    return (left + latest) // 2


def earlier_site(active: Sequence[int]) -> int | None:
    """Where to probe when every ramp pays: halfway from the input to the first ramp."""
    if not active or min(active) < 1:
        return None
    return (min(active) - 1) // 2
