"""Synthetic ramp outputs with the shape of real ones, for tests and benchmarks of the core.

Each input has a latent easiness; deeper ramps are more confident, and a ramp agrees with the
original model more often the more confident it is. A difficulty curve over time makes drifting
streams. Real recordings come from `apparate record`; these only stand in where a model is not
the point.
"""

from __future__ import annotations

import numpy as np

from .recording import Recording


def synthetic_window(n: int, num_ramps: int, seed: int = 0, difficulty: float | np.ndarray = 0.0,
                     depths: np.ndarray | None = None, overconfidence: float | np.ndarray = 0.0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """conf [n, R] in [0.5, 1) and agree [n, R]. `difficulty` (scalar or per input) shifts
    every input harder (less confident, as calibrated as before); `overconfidence` (scalar or per
    input) lowers agreement at every confidence (the ramps' confidence misleads: what a switch to
    unfamiliar inputs does); `depths` in (0, 1) places the ramps (default: evenly spaced)."""
    rng = np.random.default_rng(seed)
    depth = (np.arange(num_ramps) + 1) / (num_ramps + 1) if depths is None else np.asarray(depths, dtype=float)
    ease = rng.uniform(0, 1, n)[:, None] - np.broadcast_to(np.asarray(difficulty, dtype=float), (n,))[:, None]
    logit = 6 * (ease + depth[None, :] - 0.9) + rng.normal(0, 1.0, (n, num_ramps))
    conf = 0.5 + 0.5 / (1 + np.exp(-logit))
    over = np.broadcast_to(np.asarray(overconfidence, dtype=float), (n,))[:, None]
    p_agree = np.clip(0.3 + 1.4 * (conf - 0.5) + 0.2 * depth[None, :] - over, 0, 1)
    agree = rng.uniform(size=(n, num_ramps)) < p_agree
    return conf, agree


def synthetic_recording(n: int, num_sites: int, seed: int = 0, classes: int = 10,
                        difficulty: float | np.ndarray = 0.0, overconfidence: float | np.ndarray = 0.0) -> Recording:
    """A Recording whose ramps behave like `synthetic_window`'s, with class predictions."""
    conf, agree = synthetic_window(n, num_sites, seed, difficulty, overconfidence=overconfidence)
    rng = np.random.default_rng(seed + 1)
    final = rng.integers(0, classes, n)
    other = (final[:, None] + rng.integers(1, classes, (n, num_sites))) % classes
    pred = np.where(agree, final[:, None], other)
    labels = np.where(rng.uniform(size=n) < 0.9, final, (final + 1) % classes)
    return Recording(conf.astype(np.float32), pred, final, labels,
                     site_names=tuple(f"site{i}" for i in range(num_sites)), meta={"synthetic": True, "seed": seed})


def drift_curve(n: int, phases: list[tuple[float, float]]) -> np.ndarray:
    """Per-input difficulty from (share of the stream, difficulty) phases, e.g. a day/night camera."""
    shares = np.array([p[0] for p in phases], dtype=float)
    bounds = np.round(np.cumsum(shares / shares.sum()) * n).astype(int)
    out = np.empty(n)
    start = 0
    for end, (_, d) in zip(bounds, phases):
        out[start:end] = d
        start = end
    return out


def synthetic_camera(n: int, num_sites: int, seed: int = 0, mean_run: float = 150.0, classes: int = 2,
                     informative: float | np.ndarray = 0.5) -> Recording:
    """An ordered stream like a fixed camera's: the original's answer holds for runs (scenes) of
    about `mean_run` inputs; each ramp answers right with probability `informative` (per site, or
    one for all) and otherwise says class 0, as an early ramp biased toward an empty scene does,
    with a confidence that tells nothing. Confidence alone cannot find the ramps' right answers;
    their answer repeating the latest final answer can."""
    rng = np.random.default_rng(seed)
    runs = np.maximum(rng.geometric(1.0 / mean_run, size=n), 1)
    scene = np.repeat(rng.integers(0, classes, runs.size), runs)[:n]
    q = np.broadcast_to(np.asarray(informative, dtype=float), (num_sites,))
    right = rng.uniform(size=(n, num_sites)) < q[None, :]
    pred = np.where(right, scene[:, None], 0)
    conf = rng.uniform(0.5, 1.0, (n, num_sites))
    return Recording(conf.astype(np.float32), pred, scene, site_names=tuple(f"site{i}" for i in range(num_sites)),
                     meta={"synthetic": "camera", "seed": seed})
