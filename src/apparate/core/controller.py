"""The controller: per-batch feedback in, an immutable Config (active ramps, thresholds) out.

Every served batch reports, for the ramps that ran, each input's confidence and whether the
ramp's answer agreed with the original model's final answer (which every input still gets).
That is enough to evaluate any thresholds on recent inputs exactly, after the fact, so the
controller's checks are counterfactual (see `core.window`).

Two loops run off that feedback:
* thresholds (fast): tuned on the window of recent inputs after start-up and after each ramp
  change, and periodically. When the current thresholds would break the constraint on the latest
  inputs (a violation), the window is searched for a change in the inputs (`Window.change_point`):
  if the errors began recently enough and clearly enough, a new regime starts there and the
  thresholds are tuned on its inputs alone, re-tuned each time it doubles in size, so an abrupt
  switch is answered within tens of inputs instead of after the old inputs have left the window.
* ramps (slow): every `adjust_every_batches` (and `min_adjust_inputs`), ramps whose utility,
  pooled over recent inputs, is not positive are dropped and one ramp is tried deeper; when all
  pay, one ramp is probed earlier; with no ramp at all, placement is re-run at the batch size
  served. The ramp budget is checked at every change at the batch size served; a site removed as
  negative is not re-added for a cooldown that doubles each time it fails again.

Everything is deterministic: the same feedback gives the same decisions, and `state()` /
`from_state()` resume exactly where the controller was.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import asdict, replace
from typing import Any, Mapping, Sequence

import numpy as np

from .adjust import BudgetPoint
from .exits import simulate
from .placement import initial_placement
from .profile import LatencyProfile
from .ramp_loop import RampLoop
from .settings import Settings
from .tuning import tune
from .types import Config, Event, Feedback
from .window import Window

__all__ = ["Config", "Controller", "Event", "Feedback"]

FORMAT = "apparate.controller/2"


class Controller(RampLoop):
    def __init__(self, profile: LatencyProfile, settings: Settings | None = None, config: Config | None = None,
                 bootstrap: tuple[np.ndarray, np.ndarray] | None = None):
        self._profile = profile
        self.settings = settings or Settings()
        cfg = config or Config()
        if cfg.sites and max(cfg.sites) >= profile.num_sites:
            raise ValueError(f"config site {max(cfg.sites)} beyond the profile's {profile.num_sites} sites")
        if bootstrap is not None and np.asarray(bootstrap[0]).shape[1:] != (profile.num_sites,):
            raise ValueError(f"bootstrap data must cover the profile's {profile.num_sites} sites")
        self._config = cfg
        self._bootstrap = bootstrap  # every candidate's outputs, for re-placement with no ramps
        self.window = Window(self.settings.window_inputs, profile.num_sites)
        self._batches = 0
        self._since_tune = 0
        self._violations = 0
        self._checks = 0
        self._tuned_sites: tuple[int, ...] | None = cfg.sites if config is not None else None
        self._fresh: set[int] = set()  # ramps added but not yet tuned: not judged until they are
        self._batches_at_check = 0
        self._inputs_at_check = 0
        self._tabu: dict[int, list[int]] = {}  # site -> [blocked until check, backoff]
        self._budget_slack = 0.0  # Settings.budget_slack once the profile is a measured one
        self._since = 0  # first input of the current regime (a detected change in the inputs)
        self._regime_next = 0  # regime size at which to re-tune next (0: the regime is settled)
        self._violation_at = -(10 ** 9)  # input count at the last re-tune for a violation
        self._trial: dict[str, Any] | None = None  # the configuration before a probe, and its win
        self._clean = False  # the last violation check passed, with nothing wrong since
        self._seeded = 0  # bootstrap inputs the window started with (before any served one)
        self._z = self.settings.margin_z  # the tuner's margin (adapted by released answers if adaptive)
        self._z_at_tune = self._z
        self._a_at_tune = self.settings.accuracy_constraint  # the constraint the last tune spent
        self.events: deque[Event] = deque(maxlen=1000)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_bootstrap(cls, profile: LatencyProfile, conf: np.ndarray, agree: np.ndarray,
                       settings: Settings | None = None, at: BudgetPoint | None = None) -> "Controller":
        """Initial placement and thresholds from bootstrap data over every candidate site, judged
        at `at` (batch size, text length; default the settings' placement batch size)."""
        settings = settings or Settings()
        place = initial_placement(conf, agree, profile, settings, at)
        ctl = cls(profile, settings, Config(place.sites, place.thresholds, 0), bootstrap=(conf, agree))
        if settings.seed_window:
            point = (float(at[0]), at[1]) if at is not None else (float(settings.placement_batch_size), None)
            ctl.window.seed(conf, agree, point[0], point[1], ctl.config)
            ctl._inputs_at_check = ctl._seeded = ctl.window.written
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
        self._budget_slack = self.settings.budget_slack  # measured costs vary: see the setting
        self._fit_budget(self._budget_point(), "under the measured profile")

    @property
    def regime_start(self) -> int:
        """Served input number where the current regime began (0 unless a change was detected)."""
        return max(self._since - self._seeded, 0)

    # ------------------------------------------------------------------ feedback
    def observe(self, fb: Feedback) -> Config:
        """Take one batch's feedback; return the configuration for the next batch."""
        if fb.sites and max(fb.sites) >= self.profile.num_sites:
            raise ValueError(f"feedback site {max(fb.sites)} beyond the profile's {self.profile.num_sites} sites")
        wrong_served, wrong = self.window.record(fb, self._batches, self._config)
        self._batches += 1
        # inputs, not rows: a sampled row stands for 1/share of them (early stop)
        self._since_tune += fb.batch_size if fb.weight is None else float(fb.weight.sum())

        s = self.settings
        if s.margin_rule == "adaptive":
            self._adapt_margin(wrong_served, fb.batch_size)
        if self._tuned_sites != self._config.sites and self._tune("reconfigured"):
            pass
        elif self._fresh and self._fresh_ready() and self._tune("new ramp has data"):
            pass
        elif wrong and self._drifted():
            pass
        elif self._violated(wrong):
            self._violations += 1
            self._on_violation()
        else:
            self._violations = 0
            if self._regime_next and self._regime_inputs() >= self._regime_next:
                self._regime_grew()
            elif self._since_tune >= s.retune_every_inputs:
                self._tune("periodic")
            elif abs(self._z - self._z_at_tune) >= s.margin_retune:
                self._tune(f"margin z={self._z:.2f}")
            elif s.guard_window and s.accuracy_constraint > 0 and \
                    abs((a := self.guarded_constraint()) - self._a_at_tune) >= s.accuracy_constraint / 4:
                # tightening: on the latest inputs, where the errors are (as for a violation)
                recent = s.violation_tune_inputs if a < self._a_at_tune else 0
                self._tune(f"window guard (spends {a:.2%})", recent or None)
        # Ramps are not judged while a new regime is young, or while the window guard holds the
        # thresholds down: every ramp would look as if it did not pay.
        if (self._batches - self._batches_at_check >= s.adjust_every_batches
                and self.window.written - self._inputs_at_check >= s.min_adjust_inputs
                and not self._regime_next and self._a_at_tune >= s.accuracy_constraint):
            self._batches_at_check, self._inputs_at_check = self._batches, self.window.written
            self._adjust()
        return self._config

    def _adapt_margin(self, wrong: int, n: int) -> None:
        """Adaptive conformal inference's update, on the margin: the long-run share of wrong
        released answers is driven to `margin_aim` of the constraint, whatever the tuner's
        selection bias and the drift make of a fixed margin."""
        s = self.settings
        z = self._z + s.margin_gain * (wrong - s.margin_aim * s.accuracy_constraint * n)
        self._z = float(min(max(z, s.margin_z_min), s.margin_z_max))

    def guarded_constraint(self) -> float:
        """The loss the tuner may spend now: the constraint, or less when the wrong answers among
        the latest `guard_window` inputs leave less of the window's allowance (`guard_loss` times
        the constraint) than the constraint's share of a window."""
        return self.guard_stats()["spends"]

    @property
    def margin_z(self) -> float:
        """The margin (standard errors) the next tune will use."""
        return self._z

    def rescored(self, reason: str) -> None:
        """The window's confidences were replaced by new scores (a learned exit rule refitted):
        the counterfactual is recomputed and the thresholds re-tuned for the new scale."""
        self.window.refresh(self._config)
        self._clean = False
        if not self._tune(reason):
            self._tuned_sites = None  # tune as soon as there is data

    def _regime_inputs(self) -> int:
        return self.window.written - self._since

    # ------------------------------------------------------------------ threshold loop
    def _violated(self, wrong: int) -> bool:
        """Would the current thresholds break the constraint on the latest inputs, by more than
        `violation_z` standard errors of a loss at the constraint over that many inputs? (Thresholds
        tuned to spend the constraint exceed it on some 256 inputs by chance alone.) Without a new
        wrong answer since a check that passed, under the same configuration, it still passes."""
        if not wrong and self._clean:
            return False
        s = self.settings
        loss, valid = self.window.counterfactual_loss(s.recent_inputs)
        a = s.accuracy_constraint
        bad = valid >= min(s.recent_inputs, s.min_tune_inputs) and \
            loss > a + s.violation_z * float(np.sqrt(a * (1 - a) / max(valid, 1))) + 1e-12
        self._clean = not bad and valid >= min(s.recent_inputs, s.min_tune_inputs)
        return bad

    def _drifted(self) -> bool:
        """After a wrong answer: did the inputs change? If the current thresholds' errors since
        some recent input exceed twice the constraint by `change_evidence` wrong answers (the
        change point located against twice the constraint, the likelihood-ratio reference between
        a loss at the constraint and one three times it, so the old regime's own errors do not
        pull it back), a new regime starts there and is tuned on its own inputs at once."""
        s = self.settings
        start, excess = self.window.change_point(2 * s.accuracy_constraint, self._since)
        if excess < s.change_evidence or start <= self._since:
            return False
        self._since = start
        self._regime_next = s.min_regime_inputs
        while self._regime_next <= self._regime_inputs():
            self._regime_next *= 2
        self._event("drift", f"errors above the constraint since input {start - self._seeded} "
                             f"({excess:.1f} wrong beyond twice it): a new regime")
        self._violation_at = self.window.written
        if not self._tune("drift"):
            self._set(self._config.sites, (0.0,) * len(self._config.sites), "emergency",
                      "too little data in the new regime: thresholds 0")
            self._since_tune = 0
        return True

    def _on_violation(self) -> None:
        s = self.settings
        if s.emergency_action != "regime" and self._violations >= s.emergency_after:
            self._emergency()
            return
        # Re-tuning on the same inputs gives the same thresholds: wait for new ones.
        if self.window.written - self._violation_at < s.min_regime_inputs:
            return
        self._violation_at = self.window.written
        # the latest inputs are the ones the thresholds fail on: tune on them (with their margin)
        self._tune("violation", s.violation_tune_inputs or None)

    def _regime_grew(self) -> None:
        """Re-tune a young regime each time it doubles, until it fills the window."""
        n = self._regime_inputs()
        self._regime_next = 2 * self._regime_next if 2 * self._regime_next < self.settings.window_inputs else 0
        self._tune(f"regime of {n} inputs")

    def _tune(self, reason: str, last: int | None = None) -> bool:
        """Re-tune the active ramps on the window's (or the `last`) inputs of the current regime.
        Ramps without enough observations yet keep their thresholds. False if there is too little
        data."""
        cfg, s, win = self._config, self.settings, self.window
        if not cfg.sites:
            self._tuned_sites = cfg.sites
            self._since_tune = 0
            return True
        W = last or s.window_inputs
        regime = self._regime_inputs()
        need = s.min_tune_inputs if regime >= s.min_tune_inputs else s.min_regime_inputs
        ready = [site for site, c in zip(cfg.sites, win.seen(cfg.sites, W, self._since)) if c >= need]
        if not ready:
            return False
        conf, agree, bs, length, evidence = win.weighted_rows(cfg.sites, ready, W, self._since,
                                                              s.placement_batch_size)
        if evidence < need:
            return False
        fixed = {j: t for j, (site, t) in enumerate(zip(cfg.sites, cfg.thresholds)) if site not in ready}
        self._fresh -= set(ready)
        if self._z != s.margin_z:
            s = replace(s, margin_z=self._z)
        self._z_at_tune = self._z
        self._a_at_tune = self.guarded_constraint()
        if self._a_at_tune != s.accuracy_constraint:
            s = replace(s, accuracy_constraint=self._a_at_tune)
        res = tune(conf, agree, self.profile.table(bs, cfg.sites, length), s, fixed=fixed, evidence=evidence)
        # Ramps still gathering data join at the next periodic re-tune.
        self._since_tune = 0
        self._tuned_sites = cfg.sites
        self._set(cfg.sites, tuple(float(t) for t in res.thresholds), "tune",
                  f"{reason}: n={conf.shape[0]} win={res.result.win:.3f} acc={res.result.accuracy:.4f}")
        return True

    def _fresh_ready(self) -> bool:
        seen = self.window.seen(sorted(self._fresh), self.settings.window_inputs, self._since)
        return bool(np.all(seen >= self.settings.min_tune_inputs))

    def _emergency(self) -> None:
        """The artifact's emergency actions: 'zero' (CV) disables the ramps that released wrong
        answers on the latest inputs, 'shrink' (NLP) scales their thresholds down."""
        cfg, s = self._config, self.settings
        firing = [site for site, t in zip(cfg.sites, cfg.thresholds) if t > 0]
        conf, agree, bs, length = self.window.rows(cfg.sites, firing, s.recent_inputs, self._since)
        res = simulate(conf, agree, np.asarray(cfg.thresholds), self.profile.table(bs, cfg.sites, length),
                       validate=False)
        wrong = np.bincount(res.exit_index[~res.correct], minlength=len(cfg.sites) + 1)[:len(cfg.sites)]
        factor = 0.0 if s.emergency_action == "zero" else s.emergency_shrink
        thr = tuple(t * factor if w > 0 else t for t, w in zip(cfg.thresholds, wrong))
        self._set(cfg.sites, thr, "emergency", f"{s.emergency_action} ramps {[x for x, w in zip(cfg.sites, wrong) if w]}")
        self._since_tune = 0

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
            self.window.refresh(self._config)
            self._clean = False  # the counterfactual changed: check again
        self._event(kind, detail)

    def _event(self, kind: str, detail: str) -> None:
        self.events.append(Event(self._batches, self.window.written - self._seeded, kind, detail, self._config.version))

    # ------------------------------------------------------------------ live statistics
    def stats(self) -> dict[str, Any]:
        """Accuracy of released answers and exit shares over the window, for dashboards."""
        win = self.window
        idx = win.last(self.settings.window_inputs)
        idx = idx[win.batch[idx] >= 0]  # served inputs only (not the bootstrap's)
        exits = win.exit[idx]
        per_site = {int(x): float((exits == x).mean()) for x in np.unique(exits) if x >= 0} if idx.size else {}
        return {
            "version": self._config.version,
            "sites": list(self._config.sites),
            "thresholds": list(self._config.thresholds),
            "window_inputs": int(idx.size),
            "window_accuracy": float(np.average(win.correct[idx], weights=win.w[idx])) if idx.size else 1.0,
            "exit_rates": per_site,
            "batches": self._batches,
            "inputs": win.written - self._seeded,
            "regime_start": max(self._since - self._seeded, 0),
            **({"guard": self.guard_stats()} if self.settings.guard_window else {}),
        }

    def guard_stats(self) -> dict[str, Any]:
        """The window guard's view: its window, the wrong answers among its latest inputs, and
        what the tuner may spend now (`guarded_constraint`; the constraint when the guard is off)."""
        s = self.settings
        a = s.accuracy_constraint
        if not s.guard_window:
            return {"window": 0, "wrong": 0.0, "spends": a}
        g = min(s.guard_window, s.window_inputs)
        wrong = self.window.recent_wrong(g)
        return {"window": g, "wrong": wrong, "spends": float(min(a, max(s.guard_loss * a * g - wrong, 0.0) / g))}

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict[str, Any]:
        """Everything needed to resume exactly (but the bootstrap data): JSON-serialisable."""
        return {
            "format": FORMAT,
            "settings": self.settings.to_dict(),
            "profile": self._profile.to_dict(),
            "config": self._config.to_dict(),
            "tuned_sites": None if self._tuned_sites is None else list(self._tuned_sites),
            "window": self.window.state(),
            "counters": {"batches": self._batches, "since_tune": self._since_tune,
                         "violations": self._violations, "checks": self._checks,
                         "batches_at_check": self._batches_at_check, "inputs_at_check": self._inputs_at_check,
                         "since": self._since, "regime_next": self._regime_next,
                         "violation_at": self._violation_at, "clean": self._clean, "seeded": self._seeded,
                         "z": self._z, "z_at_tune": self._z_at_tune, "a_at_tune": self._a_at_tune},
            "trial": self._trial,
            "fresh": sorted(self._fresh),
            "tabu": {str(k): v for k, v in self._tabu.items()},
            "events": [asdict(e) for e in self.events],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], profile: LatencyProfile | None = None,
                   bootstrap: tuple[np.ndarray, np.ndarray] | None = None) -> "Controller":
        if state.get("format") != FORMAT:
            raise ValueError(f"not a controller state of format {FORMAT!r}: {state.get('format')!r}")
        try:
            ctl = cls(profile or LatencyProfile.from_dict(state["profile"]), Settings.from_dict(state["settings"]),
                      Config.from_dict(state["config"]), bootstrap)
            ctl.window = Window.from_state(state["window"], ctl.settings.window_inputs, ctl.profile.num_sites,
                                           ctl._config)
            c = state["counters"]
            ctl._batches, ctl._since_tune = int(c["batches"]), int(c["since_tune"])
            ctl._violations, ctl._checks = int(c["violations"]), int(c["checks"])
            ctl._batches_at_check, ctl._inputs_at_check = int(c["batches_at_check"]), int(c["inputs_at_check"])
            ctl._since, ctl._regime_next = int(c["since"]), int(c["regime_next"])
            ctl._violation_at, ctl._clean = int(c["violation_at"]), bool(c["clean"])
            ctl._seeded = int(c["seeded"])
            ctl._z = float(c.get("z", ctl.settings.margin_z))
            ctl._z_at_tune = float(c.get("z_at_tune", ctl._z))
            ctl._a_at_tune = float(c.get("a_at_tune", ctl.settings.accuracy_constraint))
            t = state["trial"]
            ctl._trial = None if t is None else {"sites": [int(x) for x in t["sites"]], "site": int(t["site"]),
                                                 "win": None if t["win"] is None else float(t["win"])}
            ctl._fresh = {int(x) for x in state["fresh"]}
            ts = state["tuned_sites"]
            ctl._tuned_sites = None if ts is None else tuple(int(x) for x in ts)
            ctl._tabu = {int(k): [int(v[0]), int(v[1])] for k, v in state["tabu"].items()}
            ctl.events.extend(Event(**e) for e in state["events"])
        except KeyError as e:
            raise ValueError(f"controller state is missing {e}") from None
        except (TypeError, IndexError) as e:
            raise ValueError(f"controller state is malformed: {e}") from None
        return ctl

    def dumps(self) -> str:
        return json.dumps(self.state())

    @classmethod
    def loads(cls, text: str) -> "Controller":
        return cls.from_state(json.loads(text))
