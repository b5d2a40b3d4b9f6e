"""Exit simulation: which exit releases each input, and what that costs and loses.

An input exits at the first active ramp whose uncertainty `1 - conf` is below the ramp's
threshold, else at the model's final output. The released answer is "correct" (for control) when
it equals the original model's answer: at a ramp that is `agree`, at the final output always.
This one function is the meaning of a configuration; tuning, adjustment, replay and the live
server all go through it or through code checked against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .profile import LatencyTable


def check_window(conf: np.ndarray, agree: np.ndarray, allow_empty: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Validate a window of ramp outputs: conf[N, R] in [0, 1] and agree[N, R] booleans."""
    conf = np.asarray(conf, dtype=np.float64)
    agree = np.asarray(agree)
    if conf.ndim != 2:
        raise ValueError(f"conf must be a 2-d array [inputs, ramps], got shape {conf.shape}")
    if agree.shape != conf.shape:
        raise ValueError(f"agree has shape {agree.shape} but conf has shape {conf.shape}")
    if conf.shape[0] == 0 and not allow_empty:
        raise ValueError("the window is empty: no inputs to evaluate")
    if conf.size:
        lo, hi = conf.min(), conf.max()
        if not (lo >= 0 and hi <= 1):  # NaN fails both comparisons
            if np.isnan(conf).any():
                raise ValueError("conf holds NaN: a ramp produced no valid confidence")
            raise ValueError(f"conf must lie in [0, 1], got range [{lo}, {hi}]")
    if agree.dtype != np.bool_:
        if not np.isin(agree, (0, 1)).all():
            raise ValueError("agree must hold booleans (or 0/1)")
        agree = agree.astype(bool)
    return conf, agree


def check_thresholds(thresholds: np.ndarray, num_ramps: int) -> np.ndarray:
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if t.size != num_ramps:
        raise ValueError(f"{t.size} thresholds for {num_ramps} ramps")
    if np.isnan(t).any():
        raise ValueError("thresholds hold NaN")
    if t.size and (t.min() < 0 or t.max() > 1):
        raise ValueError(f"thresholds must lie in [0, 1], got {t.tolist()}")
    return t


@dataclass(frozen=True, eq=False)
class ExitResult:
    """Outcome of a configuration on a window of N inputs with R active ramps."""

    exit_index: np.ndarray  # [N] int, 0..R-1 a ramp, R the final output
    correct: np.ndarray  # [N] bool, released answer equals the original model's
    latency_ms: np.ndarray  # [N]
    vanilla_ms: float
    num_ramps: int

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    @property
    def mean_latency_ms(self) -> float:
        return float(self.latency_ms.mean())

    @property
    def win(self) -> float:
        """Mean latency saved against the bare model, as a fraction of it (may be negative)."""
        return (self.vanilla_ms - self.mean_latency_ms) / self.vanilla_ms

    @cached_property
    def exit_rates(self) -> np.ndarray:
        """Share of inputs released at each ramp, the final output last: [R + 1], sums to 1."""
        return np.bincount(self.exit_index, minlength=self.num_ramps + 1) / max(self.exit_index.size, 1)


def first_exit(uncertainty: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Index of the first ramp with uncertainty below its threshold, R when none: [N]."""
    n, r = uncertainty.shape
    fires = uncertainty < thresholds[None, :]
    if r == 0:
        return np.zeros(n, dtype=np.int64)
    idx = fires.argmax(axis=1)
    idx[~fires[np.arange(n), idx]] = r
    return idx


def simulate(
    conf: np.ndarray,
    agree: np.ndarray,
    thresholds: np.ndarray,
    table: LatencyTable,
    validate: bool = True,
) -> ExitResult:
    """Release every input of a window at its first confident active ramp.

    conf, agree: [N, R] for the R active ramps in site order; thresholds: [R] in [0, 1];
    table: the latency table of the same R ramps at the batch size being simulated.
    """
    if validate:
        conf, agree = check_window(conf, agree)
        thresholds = check_thresholds(thresholds, conf.shape[1])
        if table.num_ramps != conf.shape[1]:
            raise ValueError(f"latency table has {table.num_ramps} ramps but the window has {conf.shape[1]}")
    n, r = conf.shape
    idx = first_exit(1.0 - conf, thresholds)
    agree_end = np.concatenate([agree, np.ones((n, 1), dtype=bool)], axis=1)
    correct = agree_end[np.arange(n), idx]
    latency = table.all_ms[idx]
    return ExitResult(exit_index=idx, correct=correct, latency_ms=latency, vanilla_ms=table.vanilla_ms, num_ramps=r)


def sliding_min_mean(x: np.ndarray, window: int) -> float:
    """Minimum mean over all windows of `window` consecutive values (the whole run if shorter)."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return float("nan")
    if x.size <= window:
        return float(x.mean())
    c = np.concatenate([[0.0], np.cumsum(x)])
    return float(((c[window:] - c[:-window]) / window).min())
