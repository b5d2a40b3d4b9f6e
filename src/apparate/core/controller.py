"""The controller: per-batch feedback in, an immutable Config (active ramps, thresholds) out.

Every served batch reports, for the ramps that ran, each input's confidence and whether the
ramp's answer agreed with the original model's final answer (which every input still gets).
That is enough to evaluate any thresholds on recent inputs exactly, after the fact, so the
controller's checks are counterfactual: "would the current thresholds break the constraint on
the latest inputs?", not "did the answers we happened to release break it?".

Two loops run off that feedback:
* thresholds (fast): tuned on the sliding window of recent inputs after start-up and after each
  ramp change, re-tuned when the current thresholds violate the constraint on the latest inputs
  or periodically; after `emergency_after` violations in a row the emergency action applies.
* ramps (slow): every `adjust_every_batches`, ramps whose pooled utility is not positive are
  dropped and one ramp is tried deeper; when all pay, one ramp is probed earlier. The ramp
  budget is checked at every change; a site removed as negative is not re-added for a cooldown
  that doubles each time it fails again (damping against oscillation).

The window is counted in inputs, and everything is deterministic: the same feedback gives the
same decisions, and `state()` / `from_state()` resume exactly where the controller was.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .adjust import BudgetPoint, deeper_site, earlier_site, latest_useful_site, utility_sums, within_budget
from .exits import check_thresholds, check_window, first_exit, simulate
from .placement import initial_placement
from .profile import LatencyProfile
from .settings import Settings
from .tuning import tune

FORMAT = "apparate.controller/1"


@dataclass(frozen=True)
class Config:
    """What the serving side applies to the next batch: active sites and their thresholds."""

    sites: tuple[int, ...] = ()
    thresholds: tuple[float, ...] = ()
    version: int = 0

    def __post_init__(self) -> None:
        sites = tuple(int(s) for s in self.sites)
        if len(sites) != len(self.thresholds):
            raise ValueError(f"{len(sites)} sites but {len(self.thresholds)} thresholds")
        if any(b <= a for a, b in zip(sites, sites[1:])) or any(s < 0 for s in sites):
            raise ValueError(f"sites must be non-negative and strictly increasing, got {sites}")
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

    def __post_init__(self) -> None:
        sites = tuple(int(s) for s in self.sites)
        conf = np.asarray(self.conf, dtype=np.float64)
        if conf.ndim != 2 or conf.shape[1] != len(sites):
            raise ValueError(f"conf must be [inputs, {len(sites)} sites], got shape {conf.shape}")
        conf, agree = check_window(conf, self.agree)
        if any(b <= a for a, b in zip(sites, sites[1:])) or any(s < 0 for s in sites):
            raise ValueError(f"feedback sites must be non-negative and strictly increasing, got {sites}")
        thr = check_thresholds(self.thresholds, len(sites))
        if self.length is not None and not (np.isfinite(self.length) and self.length > 0):
            raise ValueError(f"length must be positive, got {self.length}")
        object.__setattr__(self, "sites", sites)
        object.__setattr__(self, "thresholds", tuple(float(t) for t in thr))
        object.__setattr__(self, "conf", conf)
        object.__setattr__(self, "agree", agree)

    @classmethod
    def trusted(cls, sites: tuple[int, ...], thresholds: tuple[float, ...], conf: np.ndarray, agree: np.ndarray,
                length: float | None = None) -> "Feedback":
        """Skip validation, for callers whose data is already checked (the replay simulator feeds
        a Recording that was validated when loaded). Same fields, same meaning."""
        fb = object.__new__(cls)
        for name, value in (("sites", sites), ("thresholds", thresholds), ("conf", conf), ("agree", agree),
                            ("length", length)):
            object.__setattr__(fb, name, value)
        return fb

    @property
    def batch_size(self) -> int:
        return int(self.conf.shape[0])

    def released(self) -> tuple[np.ndarray, np.ndarray]:
        """(exit index per input, 0..R with R the final output; answer agrees with original)."""
        n, R = self.conf.shape
        idx = first_exit(1.0 - self.conf, np.asarray(self.thresholds))
        ok = np.ones(n, dtype=bool)
        at = idx < R
        ok[at] = self.agree[np.flatnonzero(at), idx[at]]
        return idx, ok


@dataclass(frozen=True)
class Event:
    """A decision, for timelines and logs."""

    batch: int
    inputs: int
    kind: str  # start, tune, violation, emergency, add, remove, move, no_change
    detail: str
    version: int


class Controller:
    def __init__(self, profile: LatencyProfile, settings: Settings | None = None, config: Config | None = None):
        self._profile = profile
        self.settings = settings or Settings()
        cfg = config or Config()
        if cfg.sites and max(cfg.sites) >= profile.num_sites:
            raise ValueError(f"config site {max(cfg.sites)} beyond the profile's {profile.num_sites} sites")
        self._config = cfg
        W, S = self.settings.window_inputs, profile.num_sites
        # Ring buffer of the last W inputs. conf is NaN where a site did not run for that input.
        self._conf = np.full((W, S), np.nan)
        self._agree = np.zeros((W, S), dtype=bool)
        self._bs = np.zeros(W)
        self._len = np.full(W, np.nan)
        self._correct = np.ones(W, dtype=bool)  # released answer agreed (as actually served)
        self._exit = np.full(W, -1, dtype=np.int64)  # site that released it, -1 = final output
        self._batch = np.full(W, -1, dtype=np.int64)  # batch index of each input
        # Counterfactual: would the current config's answer agree with the original's? Valid
        # where every firing ramp of the current config ran. Refreshed when the config changes.
        self._cf_ok = np.ones(W, dtype=bool)
        self._cf_valid = np.zeros(W, dtype=bool)
        self._written = 0
        self._batches = 0
        self._since_tune = 0
        self._violations = 0
        self._checks = 0
        self._tuned_sites: tuple[int, ...] | None = cfg.sites if config is not None else None
        self._fresh: set[int] = set()  # ramps added but not yet tuned: not judged until they are
        self._batches_at_check = 0
        self._inputs_at_check = 0
        self._tabu: dict[int, list[int]] = {}  # site -> [blocked until check, backoff]
        self.events: deque[Event] = deque(maxlen=1000)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_bootstrap(cls, profile: LatencyProfile, conf: np.ndarray, agree: np.ndarray,
                       settings: Settings | None = None, batch_size: float | None = None) -> "Controller":
        """Initial placement and thresholds from bootstrap data over every candidate site."""
        settings = settings or Settings()
        place = initial_placement(conf, agree, profile, settings, batch_size)
        ctl = cls(profile, settings, Config(place.sites, place.thresholds, 0))
        ctl._event("start", f"placement={settings.placement} sites={list(place.sites)} "
                            f"bootstrap win={place.win:.3f} acc={place.accuracy:.4f}")
        return ctl

    @property
    def config(self) -> Config:
        return self._config

    @property
    def profile(self) -> LatencyProfile:
        return self._profile

    @profile.setter
    def profile(self, profile: LatencyProfile) -> None:
        """A new profile (e.g. measured while serving): the active ramps must still fit the
        budget under it, so the ones that fit least are dropped at once if they do not."""
        if profile is self._profile:  # the server hands the same one over on every batch
            return
        if profile.num_sites != self._profile.num_sites:
            raise ValueError(f"new profile has {profile.num_sites} sites, not {self._profile.num_sites}")
        self._profile = profile
        self._fit_budget(self._budget_point(), "under the measured profile")

    def _fit_budget(self, at: BudgetPoint | None, why: str) -> bool:
        """Drop ramps until the active ones fit the budget at `at`; True if any was dropped."""
        sites = list(self._config.sites)
        if within_budget(sites, self._profile, self.settings, at):
            return False
        cost = self._profile.site_overheads(*(at or (None, None)))
        pooled = self._pooled() or {}
        while sites and not within_budget(sites, self._profile, self.settings, at):
            # the lowest utility per unit of cost goes first; without evidence, the costliest
            sites.remove(min(sites, key=lambda x: (pooled[x]["utility"] / max(cost[x], 1e-12), -cost[x])
                             if x in pooled else (0.0, -cost[x])))
        self._reconfigure(sites, "remove", f"over the ramp budget {why}: keep {sites}")
        return True

    # ------------------------------------------------------------------ feedback
    def observe(self, fb: Feedback) -> Config:
        """Take one batch's feedback; return the configuration for the next batch."""
        if fb.sites and max(fb.sites) >= self.profile.num_sites:
            raise ValueError(f"feedback site {max(fb.sites)} beyond the profile's {self.profile.num_sites} sites")
        n = fb.batch_size
        self._record(fb)
        self._batches += 1
        self._since_tune += n

        s = self.settings
        cfg = self._config
        if self._tuned_sites != cfg.sites and self._tune("reconfigured"):
            pass
        elif self._fresh and self._fresh_ready() and self._tune("new ramp has data"):
            pass
        elif self._violated():
            self._violations += 1
            if self._violations >= s.emergency_after:
                self._emergency()
            else:
                self._tune("violation")
        else:
            self._violations = 0
            if self._since_tune >= s.retune_every_inputs:
                self._tune("periodic")
        if (self._batches - self._batches_at_check >= s.adjust_every_batches
                and self._written - self._inputs_at_check >= s.min_adjust_inputs):
            self._batches_at_check, self._inputs_at_check = self._batches, self._written
            self._adjust()
        return self._config

    def _record(self, fb: Feedback) -> None:
        W = self.settings.window_inputs
        n = fb.batch_size
        keep = min(n, W)  # a batch larger than the window keeps its last W inputs
        rows = (self._written + np.arange(n - keep, n)) % W
        cols = np.asarray(fb.sites, dtype=np.int64)
        exit_idx, ok = fb.released()
        self._conf[rows] = np.nan
        self._agree[rows] = False
        if cols.size:
            self._conf[rows[:, None], cols] = fb.conf[n - keep:]
            self._agree[rows[:, None], cols] = fb.agree[n - keep:]
        self._bs[rows] = n
        self._len[rows] = np.nan if fb.length is None else fb.length
        self._correct[rows] = ok[n - keep:]
        self._exit[rows] = np.append(cols, -1)[exit_idx][n - keep:]
        self._batch[rows] = self._batches
        self._written += n
        cfg = self._config
        if fb.sites == cfg.sites and fb.thresholds == cfg.thresholds:
            self._cf_ok[rows] = ok[n - keep:]  # served with the current config: that is the answer
            self._cf_valid[rows] = True
        else:
            self._refresh_counterfactual(rows)

    def _refresh_counterfactual(self, rows: np.ndarray | None = None) -> None:
        """Recompute, for some rows (default: the whole window), whether the current config
        would release an answer that agrees with the original."""
        if rows is None:
            rows = self._last(self.settings.window_inputs)
        cfg = self._config
        firing = [j for j, t in enumerate(cfg.thresholds) if t > 0]
        if not firing:
            self._cf_ok[rows] = True
            self._cf_valid[rows] = True
            return
        cols = np.asarray(cfg.sites)
        conf = self._conf[rows[:, None], cols]
        seen = ~np.isnan(conf)
        self._cf_valid[rows] = seen[:, firing].all(axis=1)
        conf = np.where(seen, conf, 0.0)
        idx = first_exit(1.0 - conf, np.asarray(cfg.thresholds))
        agree = self._agree[rows[:, None], cols]
        ok = np.ones(rows.size, dtype=bool)
        at = idx < len(cfg.sites)
        ok[at] = agree[np.flatnonzero(at), idx[at]]
        self._cf_ok[rows] = ok

    # ------------------------------------------------------------------ window access
    def _last(self, k: int) -> np.ndarray:
        m = min(k, self._written, self.settings.window_inputs)
        return (np.arange(self._written - m, self._written)) % self.settings.window_inputs

    def _rows(self, sites: Sequence[int], need: Sequence[int], last: int):
        """Rows among the last `last` inputs where every site in `need` ran: conf/agree for
        `sites` (0 confidence where a site did not run), mean batch size and length."""
        idx = self._last(last)
        cols = list(sites)
        if need:
            idx = idx[~np.isnan(self._conf[np.ix_(idx, list(need))]).any(axis=1)]
        conf = np.nan_to_num(self._conf[np.ix_(idx, cols)], nan=0.0)
        agree = self._agree[np.ix_(idx, cols)]
        bs = float(self._bs[idx].mean()) if idx.size else float(self.settings.placement_batch_size)
        return conf, agree, bs, self._mean_length(idx)

    def _mean_length(self, idx: np.ndarray) -> float | None:
        lens = self._len[idx]
        return float(np.nanmean(lens)) if idx.size and not np.isnan(lens).all() else None

    # ------------------------------------------------------------------ threshold loop
    def _violated(self) -> bool:
        """Would the current thresholds break the constraint on the latest inputs?"""
        idx = self._last(self.settings.recent_inputs)
        valid = self._cf_valid[idx]
        if valid.sum() < min(self.settings.recent_inputs, self.settings.min_tune_inputs):
            return False
        loss = 1.0 - self._cf_ok[idx][valid].mean()
        return loss > self.settings.accuracy_constraint + 1e-12

    def _tune(self, reason: str, last: int | None = None) -> bool:
        """Re-tune the active ramps on the window (or the last `last` inputs). Ramps without
        enough observations yet keep their thresholds. False if there is too little data."""
        cfg, s = self._config, self.settings
        if not cfg.sites:
            self._tuned_sites = cfg.sites
            self._since_tune = 0
            return True
        last = last or s.window_inputs
        idx = self._last(last)
        seen = (~np.isnan(self._conf[np.ix_(idx, list(cfg.sites))])).sum(axis=0)
        need = min(s.min_tune_inputs, last)
        ready = [site for site, c in zip(cfg.sites, seen) if c >= need]
        if not ready:
            return False
        conf, agree, bs, length = self._rows(cfg.sites, ready, last)
        if conf.shape[0] < need:
            return False
        fixed = {j: t for j, (site, t) in enumerate(zip(cfg.sites, cfg.thresholds)) if site not in ready}
        self._fresh -= set(ready)
        res = tune(conf, agree, self.profile.table(bs, cfg.sites, length), s, fixed=fixed)
        # Ramps still gathering data join at the next periodic re-tune.
        self._since_tune = 0
        self._tuned_sites = cfg.sites
        self._set(cfg.sites, tuple(float(t) for t in res.thresholds), "tune",
                  f"{reason}: n={conf.shape[0]} win={res.result.win:.3f} acc={res.result.accuracy:.4f}")
        return True

    def _fresh_ready(self) -> bool:
        idx = self._last(self.settings.window_inputs)
        seen = (~np.isnan(self._conf[np.ix_(idx, sorted(self._fresh))])).sum(axis=0)
        return bool(np.all(seen >= self.settings.min_tune_inputs))

    def _emergency(self) -> None:
        cfg, s = self._config, self.settings
        if s.emergency_action == "retune_recent":
            if not self._tune("emergency", last=s.recent_inputs):
                self._set(cfg.sites, (0.0,) * len(cfg.sites), "emergency", "too little data: all thresholds 0")
            return
        firing = [site for site, t in zip(cfg.sites, cfg.thresholds) if t > 0]
        conf, agree, bs, length = self._rows(cfg.sites, firing, s.recent_inputs)
        res = simulate(conf, agree, np.asarray(cfg.thresholds), self.profile.table(bs, cfg.sites, length),
                       validate=False)
        wrong = np.bincount(res.exit_index[~res.correct], minlength=len(cfg.sites) + 1)[:len(cfg.sites)]
        factor = 0.0 if s.emergency_action == "zero" else s.emergency_shrink
        thr = tuple(t * factor if w > 0 else t for t, w in zip(cfg.thresholds, wrong))
        self._set(cfg.sites, thr, "emergency", f"{s.emergency_action} ramps {[x for x, w in zip(cfg.sites, wrong) if w]}")
        self._since_tune = 0

    # ------------------------------------------------------------------ ramp loop
    def _pooled(self) -> dict[int, dict[str, float]] | None:
        """Per active site, judged on recent inputs under the current thresholds: pooled utility
        (ms/input), share of batches with utility <= 0, share of inputs released, inputs seen.
        None while some site has too little evidence."""
        cfg, s = self._config, self.settings
        idx = self._last(s.window_inputs)
        if not idx.size:
            return None
        batches = self._batch[idx]
        first = max(self._batches - s.utility_batches, 0)
        recent = batches >= first
        if recent.sum() < s.min_evidence_inputs:  # extend back to enough inputs
            recent[-s.min_evidence_inputs:] = True
        idx = idx[recent]
        idx = idx[~np.isnan(self._conf[np.ix_(idx, list(cfg.sites))]).any(axis=1)]
        if idx.size < max(s.min_evidence_inputs, 1):
            return None
        conf = self._conf[np.ix_(idx, list(cfg.sites))]
        table = self.profile.table(float(self._bs[idx].mean()), cfg.sites, self._mean_length(idx))
        per_input = utility_sums(conf, np.asarray(cfg.thresholds), table, per_input=True)
        gain = per_input.savings - per_input.overhead  # [n, R]
        _, batch_of = np.unique(self._batch[idx], return_inverse=True)
        per_batch = np.stack([np.bincount(batch_of, weights=gain[:, j]) for j in range(gain.shape[1])], axis=1)
        n = idx.size
        return {site: {"utility": float(gain[:, j].sum() / n),
                       "nonpos_share": float((per_batch[:, j] <= 0).mean()),
                       "exit_rate": float(per_input.released[:, j].sum() / n), "inputs": n}
                for j, site in enumerate(cfg.sites)}

    def _blocked(self, site: int) -> bool:
        t = self._tabu.get(site)
        return t is not None and self._checks < t[0]

    def _block(self, site: int) -> None:
        prev = self._tabu.get(site)
        backoff = max(self.settings.cooldown_adjustments, 1) if prev is None else prev[1] * 2
        self._tabu[site] = [self._checks + backoff, backoff]

    def _budget_point(self) -> BudgetPoint | None:
        """Where the ramp budget is judged: the median batch size (and the mean text length) the
        window's inputs were served at; the worst case until there is evidence."""
        s = self.settings
        if not s.budget_at_served_batch:
            return None
        idx = self._last(s.window_inputs)
        if idx.size < max(s.min_evidence_inputs, 1):
            return None
        lens = self._len[idx]
        length = None if np.isnan(lens).all() else float(np.nanmean(lens))
        return float(np.median(self._bs[idx])), length

    def _adjust(self) -> None:
        cfg, s = self._config, self.settings
        self._checks += 1
        at = self._budget_point()
        if self._fit_budget(at, "at the batch size served"):  # e.g. the load fell: smaller batches
            return
        _, _, bs, length = self._rows(cfg.sites, cfg.sites, s.window_inputs)
        latest = latest_useful_site(self.profile, bs, length)
        if not cfg.sites:
            site = deeper_site([], latest)
            if site is not None and not self._blocked(site) and within_budget([site], self.profile, s, at):
                self._reconfigure([site], "add", f"no ramps: try site {site}")
            return
        pooled = self._pooled()
        if pooled is None:
            return
        negative = [x for x in cfg.sites if x not in self._fresh
                    and pooled[x]["utility"] <= 0 and pooled[x]["nonpos_share"] >= s.negative_share]
        if negative:
            # If re-tuning alone wins enough, the ramps are fine and the thresholds were stale.
            conf, agree, bs_w, len_w = self._rows(cfg.sites, cfg.sites, s.window_inputs)
            if conf.shape[0] >= s.min_tune_inputs:
                table = self.profile.table(bs_w, cfg.sites, len_w)
                now = simulate(conf, agree, np.asarray(cfg.thresholds), table, validate=False).win
                res = tune(conf, agree, table, s)
                if res.result.win - now > s.tune_gap:
                    self._since_tune = 0
                    self._set(cfg.sites, tuple(float(t) for t in res.thresholds), "tune",
                              f"re-tune beats adjustment: win {now:.3f} -> {res.result.win:.3f}")
                    return
            if set(negative) == set(cfg.sites) and latest in negative:
                keep = [max(negative)]  # nothing deeper to try: keep the deepest
                for x in cfg.sites:
                    if x not in keep:
                        self._block(x)
                self._reconfigure(keep, "remove", f"all negative {negative}; keep deepest {keep}")
                return
            keep = [x for x in cfg.sites if x not in negative]
            for x in negative:
                self._block(x)
            deeper = deeper_site(cfg.sites, latest)
            released = sum(pooled[x]["exit_rate"] for x in keep)
            detail = f"negative {negative}"
            if (deeper is not None and deeper not in keep and not self._blocked(deeper)
                    and released <= s.exit_rate_guard and within_budget(keep + [deeper], self.profile, s, at)):
                keep.append(deeper)
                detail += f"; try deeper {deeper}"
            self._reconfigure(sorted(keep), "remove", detail)
            return
        # Every ramp pays: probe one earlier (once the last probe has been tuned and judged).
        if self._fresh:
            return
        cand = earlier_site(cfg.sites)
        if cand is None or self._blocked(cand) or cand in cfg.sites:
            return
        if within_budget(list(cfg.sites) + [cand], self.profile, s, at):
            self._reconfigure(sorted(list(cfg.sites) + [cand]), "add", f"all pay; probe earlier {cand}")
            return
        util = {x: pooled[x]["utility"] for x in cfg.sites}
        victim = (min if s.move_removes == "lowest" else max)(cfg.sites, key=lambda x: (util[x], x))
        new = sorted([x for x in cfg.sites if x != victim] + [cand])
        if within_budget(new, self.profile, s, at):
            self._reconfigure(new, "move", f"all pay; move {victim} -> {cand}")

    def _reconfigure(self, sites: Sequence[int], kind: str, detail: str) -> None:
        cfg = self._config
        old = dict(zip(cfg.sites, cfg.thresholds))
        sites = tuple(sorted(sites))
        thr = tuple(old.get(x, self.settings.new_ramp_threshold) for x in sites)
        self._fresh = (self._fresh | (set(sites) - set(cfg.sites))) & set(sites)
        self._set(sites, thr, kind, detail)
        # Removing a ramp sends its inputs on to later ramps: re-tune now where data allows.
        self._tuned_sites = None
        self._tune("reconfigured")

    def _set(self, sites: tuple[int, ...], thresholds: tuple[float, ...], kind: str, detail: str) -> None:
        cfg = self._config
        if sites != cfg.sites or thresholds != cfg.thresholds:
            self._config = Config(sites, thresholds, cfg.version + 1)
            self._refresh_counterfactual()
        self._event(kind, detail)

    def _event(self, kind: str, detail: str) -> None:
        self.events.append(Event(self._batches, self._written, kind, detail, self._config.version))

    # ------------------------------------------------------------------ live statistics
    def stats(self) -> dict[str, Any]:
        """Accuracy of released answers and exit shares over the window, for dashboards."""
        idx = self._last(self.settings.window_inputs)
        exits = self._exit[idx]
        per_site = {int(x): float((exits == x).mean()) for x in np.unique(exits) if x >= 0} if idx.size else {}
        return {
            "version": self._config.version,
            "sites": list(self._config.sites),
            "thresholds": list(self._config.thresholds),
            "window_inputs": int(idx.size),
            "window_accuracy": float(self._correct[idx].mean()) if idx.size else 1.0,
            "exit_rates": per_site,
            "batches": self._batches,
            "inputs": self._written,
        }

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict[str, Any]:
        """Everything needed to resume exactly: JSON-serialisable."""
        return {
            "format": FORMAT,
            "settings": self.settings.to_dict(),
            "profile": self._profile.to_dict(),
            "config": self._config.to_dict(),
            "tuned_sites": None if self._tuned_sites is None else list(self._tuned_sites),
            "window": {
                "conf": np.where(np.isnan(self._conf), -1.0, self._conf).tolist(),
                "agree": self._agree.astype(int).tolist(),
                "bs": self._bs.tolist(),
                "len": np.where(np.isnan(self._len), -1.0, self._len).tolist(),
                "correct": self._correct.astype(int).tolist(),
                "exit": self._exit.tolist(),
                "batch": self._batch.tolist(),
            },
            "counters": {"written": self._written, "batches": self._batches, "since_tune": self._since_tune,
                         "violations": self._violations, "checks": self._checks,
                         "batches_at_check": self._batches_at_check, "inputs_at_check": self._inputs_at_check},
            "fresh": sorted(self._fresh),
            "tabu": {str(k): v for k, v in self._tabu.items()},
            "events": [asdict(e) for e in self.events],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], profile: LatencyProfile | None = None) -> "Controller":
        if state.get("format") != FORMAT:
            raise ValueError(f"not a controller state of format {FORMAT!r}: {state.get('format')!r}")
        try:
            ctl = cls(profile or LatencyProfile.from_dict(state["profile"]), Settings.from_dict(state["settings"]),
                      Config.from_dict(state["config"]))
            w = state["window"]
            conf = np.asarray(w["conf"], dtype=np.float64)
            if conf.shape != ctl._conf.shape:
                raise ValueError(f"window shape {conf.shape} does not match {ctl._conf.shape}")
            ctl._conf = np.where(conf < 0, np.nan, conf)
            ctl._agree = np.asarray(w["agree"], dtype=bool)
            ctl._bs = np.asarray(w["bs"], dtype=np.float64)
            lens = np.asarray(w["len"], dtype=np.float64)
            ctl._len = np.where(lens < 0, np.nan, lens)
            ctl._correct = np.asarray(w["correct"], dtype=bool)
            ctl._exit = np.asarray(w["exit"], dtype=np.int64)
            ctl._batch = np.asarray(w["batch"], dtype=np.int64)
            c = state["counters"]
            ctl._written, ctl._batches, ctl._since_tune = c["written"], c["batches"], c["since_tune"]
            ctl._violations, ctl._checks = c["violations"], c["checks"]
            ctl._batches_at_check, ctl._inputs_at_check = c["batches_at_check"], c["inputs_at_check"]
            ctl._fresh = set(state["fresh"])
            ts = state["tuned_sites"]
            ctl._tuned_sites = None if ts is None else tuple(ts)
            ctl._tabu = {int(k): list(v) for k, v in state["tabu"].items()}
            ctl.events.extend(Event(**e) for e in state["events"])
            ctl._refresh_counterfactual()
        except KeyError as e:
            raise ValueError(f"controller state is missing {e}") from None
        return ctl

    def dumps(self) -> str:
        return json.dumps(self.state())

    @classmethod
    def loads(cls, text: str) -> "Controller":
        return cls.from_state(json.loads(text))
