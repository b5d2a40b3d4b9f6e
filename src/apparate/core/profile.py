"""LatencyProfile: what each part of an early-exit model costs, per batch size.

For every profiled batch size (and, for text, every input-length bucket) the profile holds the
cumulative backbone time to the end of each candidate site, the cost of each candidate ramp, and
the bare model's total. All times are milliseconds. Everything the control loops need about time
comes from here, through `LatencyTable`s for one batch size and one set of active ramps.

Batch sizes between measured ones are interpolated linearly (never rounded up to a power of two);
beyond the largest one the last segment is extrapolated, because batch time grows about linearly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

FORMAT = "apparate.latency_profile/1"


@dataclass(frozen=True, eq=False)
class LatencyTable:
    """Latencies for one batch size and one ordered set of active ramps (ms).

    `exit_ms[j]` is when an input exiting at active ramp j gets its answer: backbone time to the
    ramp's site plus every active ramp's cost up to and including j. `end_ms` is the non-exit
    latency: the whole backbone plus every active ramp.
    """

    site_ms: np.ndarray
    ramp_ms: np.ndarray
    vanilla_ms: float
    exit_ms: np.ndarray = field(init=False)
    end_ms: float = field(init=False)
    all_ms: np.ndarray = field(init=False)  # every exit's latency, the final output last: [R + 1]
    all_ns: np.ndarray = field(init=False)  # the same in integer ns: sums exact in any order

    def __post_init__(self) -> None:
        site = np.array(self.site_ms, dtype=np.float64).reshape(-1)  # own copies: made read-only
        ramp = np.array(self.ramp_ms, dtype=np.float64).reshape(-1)
        if site.shape != ramp.shape:
            raise ValueError(f"site_ms has {site.size} entries but ramp_ms has {ramp.size}")
        if not (np.all(np.isfinite(site)) and np.all(np.isfinite(ramp)) and np.isfinite(self.vanilla_ms)):
            raise ValueError("latency table holds a NaN or infinite time")
        if np.any(site < 0) or np.any(ramp < 0) or self.vanilla_ms <= 0:
            raise ValueError("latencies must be non-negative and the vanilla latency positive")
        object.__setattr__(self, "site_ms", site)
        object.__setattr__(self, "ramp_ms", ramp)
        object.__setattr__(self, "vanilla_ms", float(self.vanilla_ms))
        for arr in (site, ramp):
            arr.flags.writeable = False  # tables are cached and shared
        exit_ms = site + np.cumsum(ramp)
        end_ms = float(self.vanilla_ms + ramp.sum())
        all_ms = np.append(exit_ms, end_ms)
        all_ns = np.rint(all_ms * 1e6).astype(np.int64)
        for arr in (exit_ms, all_ms, all_ns):
            arr.flags.writeable = False
        object.__setattr__(self, "exit_ms", exit_ms)
        object.__setattr__(self, "end_ms", end_ms)
        object.__setattr__(self, "all_ms", all_ms)
        object.__setattr__(self, "all_ns", all_ns)

    @property
    def num_ramps(self) -> int:
        return int(self.site_ms.size)


def _as_grid(values: Any, name: str, integer: bool) -> np.ndarray:
    arr = np.asarray(values, dtype=np.int64 if integer else np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if np.any(np.diff(arr) <= 0):
        raise ValueError(f"{name} must be strictly increasing, got {arr.tolist()}")
    if integer and arr[0] < 1:
        raise ValueError(f"{name} must be positive, got {arr.tolist()}")
    return arr


def _interp_weights(grid: np.ndarray, x: float) -> tuple[int, int, float]:
    """Indices (i, j) and weight w so that value(x) = (1 - w) * v[i] + w * v[j].

    Below the grid the first point is used; above it the last segment is extrapolated.
    """
    n = grid.size
    if n == 1 or x <= grid[0]:
        return 0, 0, 0.0
    j = int(np.searchsorted(grid, x))
    if j >= n:
        j = n - 1
    i = j - 1
    return i, j, float((x - grid[i]) / (grid[j] - grid[i]))


def _interp_weights_many(grid: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_interp_weights` for many points at once: (i, j, w) arrays."""
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
    return np.where(below, 0, i), np.where(below, 0, j), np.where(below, 0.0, w)


@dataclass(frozen=True, eq=False)
class LatencyProfile:
    """Measured costs of a model and its candidate ramps.

    Arrays are indexed [length bucket, batch size, site]. Models with fixed-size inputs have a
    single length bucket. `site_ms` is cumulative backbone time (ramps excluded) to the end of
    each site; `ramp_ms` is each ramp's own cost; `vanilla_ms` is the bare model's total.
    """

    batch_sizes: np.ndarray
    site_ms: np.ndarray
    ramp_ms: np.ndarray
    vanilla_ms: np.ndarray
    lengths: np.ndarray = field(default_factory=lambda: np.array([1], dtype=np.int64))
    site_names: tuple[str, ...] = ()
    device: str = "cpu"  # where it was measured ('cpu', 'cuda:0'): times from one device do not hold on another

    def __post_init__(self) -> None:
        bs = _as_grid(self.batch_sizes, "batch_sizes", integer=True)
        lengths = _as_grid(self.lengths, "lengths", integer=True)
        L, B = lengths.size, bs.size
        site = np.asarray(self.site_ms, dtype=np.float64)
        ramp = np.asarray(self.ramp_ms, dtype=np.float64)
        van = np.asarray(self.vanilla_ms, dtype=np.float64)
        if site.ndim == 2:  # a single length bucket given without its axis
            site, ramp, van = site[None], ramp[None], van.reshape(1, -1)
        if site.ndim != 3 or site.shape[:2] != (L, B):
            raise ValueError(f"site_ms must have shape [{L}, {B}, sites], got {site.shape}")
        if ramp.shape != site.shape:
            raise ValueError(f"ramp_ms shape {ramp.shape} differs from site_ms shape {site.shape}")
        if van.shape != (L, B):
            raise ValueError(f"vanilla_ms must have shape [{L}, {B}], got {van.shape}")
        for name, arr in (("site_ms", site), ("ramp_ms", ramp), ("vanilla_ms", van)):
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"{name} holds a NaN or infinite time")
            if np.any(arr < 0):
                raise ValueError(f"{name} holds a negative time")
        if np.any(van <= 0):
            raise ValueError("vanilla_ms must be positive")
        if np.any(np.diff(site, axis=2) < 0):
            raise ValueError("cumulative site times must not decrease with depth")
        if np.any(site > van[..., None] * (1 + 1e-9)):
            raise ValueError("a site's cumulative time exceeds the whole model's time")
        names = tuple(str(n) for n in self.site_names)
        if names and len(names) != site.shape[2]:
            raise ValueError(f"{len(names)} site names for {site.shape[2]} sites")
        for attr, value in (("batch_sizes", bs), ("lengths", lengths), ("site_ms", site),
                            ("ramp_ms", ramp), ("vanilla_ms", van), ("site_names", names)):
            object.__setattr__(self, attr, value)
        object.__setattr__(self, "_cache", {})

    # ------------------------------------------------------------------ lookups
    @property
    def num_sites(self) -> int:
        return int(self.site_ms.shape[2])

    def at(self, batch_size: float, length: float | None = None) -> tuple[np.ndarray, np.ndarray, float]:
        """(site_ms[S], ramp_ms[S], vanilla_ms) interpolated at a batch size and input length."""
        if not batch_size >= 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        key = (float(batch_size), None if length is None else float(length))
        hit = self._cache.get(key)  # type: ignore[attr-defined]
        if hit is not None:
            return hit
        li, lj, lw = _interp_weights(self.lengths, self.lengths[0] if length is None else float(length))
        bi, bj, bw = _interp_weights(self.batch_sizes, float(batch_size))

        def blend(arr: np.ndarray) -> np.ndarray:
            by_len = (1 - lw) * arr[li] + lw * arr[lj]
            return (1 - bw) * by_len[bi] + bw * by_len[bj]

        site, ramp, van = blend(self.site_ms), blend(self.ramp_ms), float(blend(self.vanilla_ms))
        # Extrapolation can only scale, never make times negative or unordered.
        ramp = np.maximum(ramp, 0.0)
        van = max(van, 1e-9)
        site = np.minimum(np.maximum.accumulate(np.maximum(site, 0.0)), van)
        out = (site, ramp, van)
        if len(self._cache) < 4096:  # type: ignore[attr-defined]
            self._cache[key] = out  # type: ignore[attr-defined]
        return out

    def table(self, batch_size: float, sites: Sequence[int] | np.ndarray, length: float | None = None) -> LatencyTable:
        """Latency table for the given active sites (site order) at one batch size."""
        site_key = sites if type(sites) is tuple else tuple(int(s) for s in sites)  # a config's sites: as they are
        key = ("table", float(batch_size), site_key, None if length is None else float(length))
        hit = self._cache.get(key)  # type: ignore[attr-defined]
        if hit is not None:
            return hit
        idx = self._check_sites(sites)
        site, ramp, van = self.at(batch_size, length)
        out = LatencyTable(site_ms=site[idx], ramp_ms=ramp[idx], vanilla_ms=van)
        if len(self._cache) < 4096:  # type: ignore[attr-defined]
            self._cache[key] = out  # type: ignore[attr-defined]
        return out

    def end_ms_grid(self, sites: Sequence[int], batch_sizes: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
        """[len(lengths) or 1, len(batch_sizes)]: the non-exit latency (bare model + the given
        active ramps) at many batch sizes (and lengths) at once, interpolated exactly as `at`
        does. What batchers ask for on every decision, so it is computed once per configuration
        (the live server's `BatchCosts`, the replay simulator)."""
        sites = [int(s) for s in sites]
        ls = np.asarray(lengths if lengths is not None else [float(self.lengths[0])], dtype=np.float64)
        li, lj, lw = _interp_weights_many(self.lengths, ls)
        bi, bj, bw = _interp_weights_many(self.batch_sizes, np.asarray(batch_sizes, dtype=np.float64))

        def blend(arr: np.ndarray) -> np.ndarray:  # arr [L, B, ...] -> [len(ls), len(bs), ...]
            pad = (None,) * (arr.ndim - 1)
            by_len = (1 - lw)[(...,) + pad] * arr[li] + lw[(...,) + pad] * arr[lj]
            extra = (None,) * (arr.ndim - 2)
            return (1 - bw)[(None, slice(None)) + extra] * by_len[:, bi] + bw[(None, slice(None)) + extra] * by_len[:, bj]

        van = np.maximum(blend(self.vanilla_ms), 1e-9)
        if sites:
            return van + np.maximum(blend(self.ramp_ms[..., sites]), 0.0).sum(axis=-1)
        return van

    def vanilla(self, batch_size: float, length: float | None = None) -> float:
        return self.at(batch_size, length)[2]

    def overhead(self, sites: Iterable[int], batch_size: float | None = None, length: float | None = None) -> float:
        """Added latency of running these ramps on a non-exiting input, as a fraction of the bare
        model's latency.

        At a given batch size (and text length), else the maximum over every profiled batch
        size and length: a set of ramps within the budget then is within it whatever batch the
        server forms. Small batches are the worst case: a ramp's fixed cost (hook, Python) is
        a larger share of a short pass.
        """
        idx = self._check_sites(list(sites))
        if idx.size == 0:
            return 0.0
        if batch_size is not None:
            _, ramp, van = self.at(batch_size, length)
            return float(ramp[idx].sum() / van)
        return float(np.max(self.ramp_ms[..., idx].sum(axis=-1) / self.vanilla_ms))

    def site_overheads(self, batch_size: float | None = None, length: float | None = None) -> np.ndarray:
        """Each ramp's cost as a fraction of the bare model, at a batch size or worst case: [S]."""
        if batch_size is not None:
            _, ramp, van = self.at(batch_size, length)
            return ramp / van
        return np.max(self.ramp_ms / self.vanilla_ms[..., None], axis=(0, 1))

    def _check_sites(self, sites: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = np.asarray(sites, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_sites):
            raise ValueError(f"site index out of range 0..{self.num_sites - 1}: {idx.tolist()}")
        if np.any(np.diff(idx) <= 0):
            raise ValueError(f"active sites must be strictly increasing, got {idx.tolist()}")
        return idx

    # ------------------------------------------------------------------ updates
    def updated(
        self,
        batch_size: int,
        site_ms: Mapping[int, float],
        ramp_ms: Mapping[int, float],
        vanilla_ms: float | None = None,
        length: float | None = None,
        weight: float = 0.2,
    ) -> "LatencyProfile":
        """A new profile moved toward one measured batch (exponential smoothing).

        `site_ms` holds measured cumulative backbone times for the sites that were observed,
        `ramp_ms` measured ramp costs. The measurement is spread over the neighbouring grid points
        by their interpolation weights. Sites that were not observed are scaled by the same
        factor as the observed ones, so one slow machine shifts the whole profile, not just the
        entries that happened to be active.
        """
        if not 0 < weight <= 1:
            raise ValueError(f"weight must be in (0, 1], got {weight}")
        for name, values in (("site_ms", site_ms.values()), ("ramp_ms", ramp_ms.values())):
            if any(not np.isfinite(v) or v < 0 for v in values):
                raise ValueError(f"{name} holds a negative or non-finite measurement")
        if vanilla_ms is not None and not (np.isfinite(vanilla_ms) and vanilla_ms > 0):
            raise ValueError(f"vanilla_ms must be positive, got {vanilla_ms}")
        self._check_sites(sorted(site_ms))
        self._check_sites(sorted(ramp_ms))
        cur_site, cur_ramp, cur_van = self.at(batch_size, length)
        # Ratios measured / predicted; unobserved sites follow the observed backbone ratio.
        obs = [s for s in site_ms if cur_site[s] > 0]
        ratios = [site_ms[s] / cur_site[s] for s in obs]
        if vanilla_ms is not None:
            ratios.append(vanilla_ms / cur_van)
        backbone_ratio = float(np.median(ratios)) if ratios else 1.0
        site_ratio = np.full(self.num_sites, backbone_ratio)
        for s in obs:
            site_ratio[s] = site_ms[s] / cur_site[s]
        ramp_ratio = np.ones(self.num_sites)
        for s, v in ramp_ms.items():
            ramp_ratio[s] = v / cur_ramp[s] if cur_ramp[s] > 0 else 1.0
        van_ratio = (vanilla_ms / cur_van) if vanilla_ms is not None else backbone_ratio

        site, ramp, van = self.site_ms.copy(), self.ramp_ms.copy(), self.vanilla_ms.copy()
        li, lj, lw = _interp_weights(self.lengths, self.lengths[0] if length is None else float(length))
        bi, bj, bw = _interp_weights(self.batch_sizes, float(batch_size))
        for l_idx, l_w in ((li, 1 - lw), (lj, lw)):
            for b_idx, b_w in ((bi, 1 - bw), (bj, bw)):
                a = weight * l_w * b_w
                if a <= 0:
                    continue
                site[l_idx, b_idx] *= 1 + a * (site_ratio - 1)
                ramp[l_idx, b_idx] *= 1 + a * (ramp_ratio - 1)
                van[l_idx, b_idx] *= 1 + a * (van_ratio - 1)
        site = np.minimum(np.maximum.accumulate(site, axis=2), van[..., None])
        return LatencyProfile(self.batch_sizes, site, ramp, van, self.lengths, self.site_names, self.device)

    def with_backbone_of(self, other: "LatencyProfile") -> "LatencyProfile":
        """This profile's ramps on `other`'s backbone timings: for two preparations of the same
        model (other ramps) measured at different moments, so that they compare on one clock.
        Ramp costs are scaled by the ratio of the two bare-model times, cell by cell."""
        if (other.site_ms.shape != self.site_ms.shape or not np.array_equal(other.batch_sizes, self.batch_sizes)
                or not np.array_equal(other.lengths, self.lengths)):
            raise ValueError("the two profiles differ in sites, batch sizes or lengths: not the same backbone grid")
        ramp = self.ramp_ms * (other.vanilla_ms / self.vanilla_ms)[..., None]
        return LatencyProfile(other.batch_sizes, other.site_ms, ramp, other.vanilla_ms, other.lengths, self.site_names,
                              other.device)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "batch_sizes": self.batch_sizes.tolist(),
            "lengths": self.lengths.tolist(),
            "site_names": list(self.site_names),
            "site_ms": self.site_ms.tolist(),
            "ramp_ms": self.ramp_ms.tolist(),
            "vanilla_ms": self.vanilla_ms.tolist(),
            "device": self.device,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LatencyProfile":
        if data.get("format") != FORMAT:
            raise ValueError(f"not a latency profile of format {FORMAT!r}: {data.get('format')!r}")
        try:
            return cls(
                batch_sizes=data["batch_sizes"], site_ms=data["site_ms"], ramp_ms=data["ramp_ms"],
                vanilla_ms=data["vanilla_ms"], lengths=data["lengths"],
                site_names=tuple(data.get("site_names", ())),
                device=str(data.get("device", "cpu")),  # bundles from before devices were named: the CPU
            )
        except KeyError as e:
            raise ValueError(f"latency profile is missing field {e}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> "LatencyProfile":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def linear(
        cls,
        num_sites: int,
        vanilla_ms: float = 10.0,
        ramp_fraction: float = 0.005,
        batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
        per_item_fraction: float = 0.1,
    ) -> "LatencyProfile":
        """A synthetic profile: sites evenly spaced in time, batch time affine in batch size.

        For tests, benchmarks and quick experiments without a model.
        """
        bs = np.asarray(batch_sizes, dtype=np.float64)
        van = vanilla_ms * (1 + per_item_fraction * (bs - 1))
        frac = np.arange(1, num_sites + 1) / (num_sites + 1)
        site = van[:, None] * frac[None, :]
        ramp = np.broadcast_to(van[:, None] * ramp_fraction, site.shape).copy()
        return cls(batch_sizes=np.asarray(batch_sizes), site_ms=site, ramp_ms=ramp, vanilla_ms=van)
