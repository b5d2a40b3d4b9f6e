"""The values that flow between the serving side and the decision side.

* `Config`: what the serving side applies to the next batch (active sites, their thresholds).
* `Feedback`: what one served batch tells the decision side (per input, every active ramp's
  confidence and whether its answer agreed with the original model's final answer).
* `Event`: a decision, for logs and timelines.
* `exit_sites_of`: exit index -> site, per set of active sites (cached).
* `released`: where the exit rule releases each input and whether that answer agrees with the
  original: the one place that meaning is computed (the controller's window, its counterfactual
  checks, the server's reports and the replay all call it).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping

import numpy as np

from .exits import check_thresholds, check_window, first_exit


@lru_cache(maxsize=256)
def exit_sites_of(sites: tuple[int, ...]) -> np.ndarray:
    """Exit index (0..R, R = the final output) -> site released at (-1 for the final output), for
    a tuple of active sites; shared and read-only (computed once per set of sites)."""
    out = np.append(np.asarray(sites, dtype=np.int64), -1)
    out.flags.writeable = False
    return out


def released(conf: np.ndarray, agree: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(exit index per input, 0..R with R the final output; the released answer agrees with the
    original's) for conf/agree [n, R] of the active ramps and their thresholds [R]."""
    n, R = conf.shape
    idx = first_exit(1.0 - conf, np.asarray(thresholds, dtype=np.float64))
    ok = np.ones(n, dtype=bool)
    at = idx < R
    ok[at] = agree[np.flatnonzero(at), idx[at]]
    return idx, ok


def _check_sites(sites: Any, what: str) -> tuple[int, ...]:
    out = tuple(int(s) for s in sites)
    if any(b <= a for a, b in zip(out, out[1:])) or any(s < 0 for s in out):
        raise ValueError(f"{what} must be non-negative and strictly increasing, got {out}")
    return out


@dataclass(frozen=True)
class Config:
    """What the serving side applies to the next batch: active sites and their thresholds."""

    sites: tuple[int, ...] = ()
    thresholds: tuple[float, ...] = ()
    version: int = 0

    def __post_init__(self) -> None:
        sites = _check_sites(self.sites, "sites")
        if len(sites) != len(self.thresholds):
            raise ValueError(f"{len(sites)} sites but {len(self.thresholds)} thresholds")
        thr = tuple(float(t) for t in check_thresholds(self.thresholds, len(sites)))
        object.__setattr__(self, "sites", sites)
        object.__setattr__(self, "thresholds", thr)

    def threshold_of(self, site: int) -> float:
        return self.thresholds[self.sites.index(site)]

    def to_dict(self) -> dict[str, Any]:
        return {"sites": list(self.sites), "thresholds": list(self.thresholds), "version": self.version}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Config":
        return cls(tuple(d["sites"]), tuple(d["thresholds"]), int(d.get("version", 0)))


@dataclass(frozen=True, eq=False)
class Feedback:
    """One served batch: the ramps that ran, the thresholds it was served with, and per input
    each ramp's confidence and agreement with the original model's final answer."""

    sites: tuple[int, ...]
    thresholds: tuple[float, ...]
    conf: np.ndarray  # [n, len(sites)]
    agree: np.ndarray  # [n, len(sites)]
    length: float | None = None  # the batch's cost key (e.g. padded tokens), if any
    # [n] inverse sampling probability of each input's feedback (None: all 1). With early stop an
    # exited input reaches the final output only when sampled (probability p): its row stands for
    # 1/p inputs, so every estimate over the window stays unbiased (Horvitz-Thompson).
    weight: np.ndarray | None = None

    def __post_init__(self) -> None:
        sites = _check_sites(self.sites, "feedback sites")
        conf = np.asarray(self.conf, dtype=np.float64)
        if conf.ndim != 2 or conf.shape[1] != len(sites):
            raise ValueError(f"conf must be [inputs, {len(sites)} sites], got shape {conf.shape}")
        conf, agree = check_window(conf, self.agree)
        thr = check_thresholds(self.thresholds, len(sites))
        if self.length is not None and not (np.isfinite(self.length) and self.length > 0):
            raise ValueError(f"length must be positive, got {self.length}")
        object.__setattr__(self, "sites", sites)
        object.__setattr__(self, "thresholds", tuple(float(t) for t in thr))
        object.__setattr__(self, "conf", conf)
        object.__setattr__(self, "agree", agree)
        if self.weight is not None:
            w = np.asarray(self.weight, dtype=np.float64).reshape(-1)
            if w.shape != (conf.shape[0],) or not np.all(np.isfinite(w)) or (w.size and w.min() < 1.0):
                raise ValueError(f"weight must be [{conf.shape[0]}] finite values >= 1 (inverse sampling "
                                 f"probabilities), got shape {w.shape}")
            object.__setattr__(self, "weight", None if np.all(w == 1.0) else w)

    @classmethod
    def trusted(cls, sites: tuple[int, ...], thresholds: tuple[float, ...], conf: np.ndarray, agree: np.ndarray,
                length: float | None = None, exits: tuple[np.ndarray, np.ndarray] | None = None,
                weight: np.ndarray | None = None) -> "Feedback":
        """Skip validation, for callers whose data is already checked (the replay simulator feeds
        a Recording that was validated when loaded). Same fields, same meaning; `exits`, if
        given, is what `released()` would compute (the caller released the batch already)."""
        fb = object.__new__(cls)
        # (the fields directly: frozen dataclasses set them one object.__setattr__ at a time)
        fb.__dict__.update(sites=sites, thresholds=thresholds, conf=conf, agree=agree, length=length, weight=weight,
                           _exits=exits)
        return fb

    @property
    def batch_size(self) -> int:
        return int(self.conf.shape[0])

    def released(self) -> tuple[np.ndarray, np.ndarray]:
        """(exit index per input, 0..R with R the final output; answer agrees with original)."""
        exits = getattr(self, "_exits", None)
        return exits if exits is not None else released(self.conf, self.agree, np.asarray(self.thresholds))


@dataclass(frozen=True)
class Event:
    """A decision, for timelines and logs."""

    batch: int
    inputs: int
    kind: str  # start, tune, drift, emergency, add, remove, move, revert, place
    detail: str
    version: int
