"""The slow loop of the controller: which ramps are worth their cost, within the budget.

Mixed into `Controller` (it works on the controller's window, configuration, profile and
settings). Every `adjust_every_batches` (and `min_adjust_inputs`), each active ramp's utility is
pooled over the latest inputs that saw it; negative ramps are dropped and capacity moves deeper;
when all pay, one ramp is probed earlier, as a trial that is undone if the configuration then
wins less than before; with no ramp left, placement is re-run at the batch size served. The ramp
budget is judged at the batch size served, at every change.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .adjust import BudgetPoint, deeper_site, earlier_site, latest_useful_site, utility_sums, within_budget
from .exits import simulate
from .placement import initial_placement
from .tuning import tune


class RampLoop:
    """The ramp-adjustment half of `Controller` (see there for the state it uses)."""

    _config: Any
    _bootstrap: Any
    _fresh: set[int]
    _tabu: dict[int, list[int]]
    _checks: int
    _trial: dict[str, Any] | None
    _since: int
    _budget_slack: float

    def _fit_budget(self, at: BudgetPoint | None, why: str) -> bool:
        """Drop ramps until the active ones fit the budget at `at`; True if any was dropped. On
        a measured profile only ramps over the budget by more than `Settings.budget_slack` are
        dropped (then down to the budget itself): hysteresis against the measurements' noise."""
        sites = list(self._config.sites)
        if within_budget(sites, self._profile, self.settings, at, self._budget_slack):
            return False
        cost = self._profile.site_overheads(*(at or (None, None)))
        pooled = self._pooled() or {}
        while sites and not within_budget(sites, self._profile, self.settings, at):
            # the lowest utility per unit of cost goes first; without evidence, the costliest
            sites.remove(min(sites, key=lambda x: (pooled[x]["utility"] / max(cost[x], 1e-12), -cost[x])
                             if x in pooled else (0.0, -cost[x])))
        for x in set(self._config.sites) - set(sites):
            # a ramp measured over the budget waits out a cooldown (doubling while it recurs)
            # before placement or a probe may choose it again: a live server's measured costs
            # vary, and a ramp on the budget's edge was otherwise removed and re-placed for ever
            self._block(x)
        self._reconfigure(sites, "remove", f"over the ramp budget {why}: keep {sites}")
        return True

    def _pooled(self) -> dict[int, dict[str, float]] | None:
        """Per active site, judged under the current thresholds on the latest `utility_inputs`
        inputs of the regime that saw every active ramp: utility (ms per input, pooled over
        inputs: at batch size 1 a batch is one input, too little to judge by), share of inputs
        released, inputs seen. None while there is too little evidence."""
        cfg, s, win = self._config, self.settings, self.window
        idx = win.last(s.utility_inputs, self._since)
        conf = win.conf[np.ix_(idx, list(cfg.sites))]
        keep = ~np.isnan(conf).any(axis=1)
        idx, conf = idx[keep], conf[keep]
        if idx.size < max(s.min_evidence_inputs, 1):
            return None
        table = self.profile.table(float(win.bs[idx].mean()), cfg.sites, win.mean_length(idx))
        sums = utility_sums(conf, np.asarray(cfg.thresholds), table)
        n = idx.size
        return {site: {"utility": float(sums.utility[j]), "exit_rate": float(sums.released[j] / n), "inputs": n}
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
        idx = self.window.last(s.window_inputs)
        if idx.size < max(s.min_evidence_inputs, 1):
            return None
        return float(np.median(self.window.bs[idx])), self.window.mean_length(idx)

    def _adjust(self) -> None:
        cfg, s = self._config, self.settings
        self._checks += 1
        at = self._budget_point()
        if self._fit_budget(at, "at the batch size served"):  # e.g. the load fell: smaller batches
            return
        if not cfg.sites:
            self._replace(at)
            return
        if self._trial is not None and not self._fresh and self._judge_trial():
            return
        pooled = self._pooled()
        if pooled is None:
            return
        negative = [x for x in cfg.sites if x not in self._fresh and pooled[x]["utility"] <= 0]
        if negative:
            self._drop(negative, pooled, at)
        elif not self._fresh:  # every ramp pays: probe one earlier (once the last probe is judged)
            self._probe_earlier(pooled, at)

    def _replace(self, at: BudgetPoint | None) -> None:
        """No active ramp: place afresh at the batch size served (bootstrap data), else try the
        middle of the useful range."""
        s = self.settings
        if self._bootstrap is not None:
            boot_conf, boot_agree = self._bootstrap
            exclude = {x for x in range(self.profile.num_sites) if self._blocked(x)}
            place = initial_placement(boot_conf, boot_agree, self.profile, s, at, exclude=exclude)
            if place.sites:
                self._reconfigure(list(place.sites), "place", f"no ramps: placement at {at} gives {list(place.sites)}")
            return
        bs, length = at if at is not None else (float(s.placement_batch_size), None)
        site = deeper_site([], latest_useful_site(self.profile, bs, length))
        if site is not None and not self._blocked(site) and within_budget([site], self.profile, s, at):
            self._reconfigure([site], "add", f"no ramps: try site {site}")

    def _drop(self, negative: list[int], pooled: dict[int, dict[str, float]], at: BudgetPoint | None) -> None:
        cfg, s = self._config, self.settings
        # If re-tuning alone wins enough, the ramps are fine and the thresholds were stale.
        conf, agree, bs_w, len_w = self.window.rows(cfg.sites, cfg.sites, s.window_inputs, self._since)
        if conf.shape[0] >= s.min_tune_inputs:
            table = self.profile.table(bs_w, cfg.sites, len_w)
            now = simulate(conf, agree, np.asarray(cfg.thresholds), table, validate=False).win
            res = tune(conf, agree, table, s)
            if res.result.win - now > s.tune_gap:
                self._since_tune = 0
                self._set(cfg.sites, tuple(float(t) for t in res.thresholds), "tune",
                          f"re-tune beats adjustment: win {now:.3f} -> {res.result.win:.3f}")
                return
        latest = latest_useful_site(self.profile, bs_w, len_w)
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

    def _window_win(self) -> float | None:
        """Latency win of the current configuration on the latest `utility_inputs` inputs of the
        regime that saw all its ramps (None with too little evidence)."""
        cfg, s = self._config, self.settings
        conf, agree, bs, length = self.window.rows(cfg.sites, cfg.sites, s.utility_inputs, self._since)
        if conf.shape[0] < max(s.min_evidence_inputs, 1):
            return None
        return simulate(conf, agree, np.asarray(cfg.thresholds), self.profile.table(bs, cfg.sites, length),
                        validate=False).win

    def _judge_trial(self) -> bool:
        """A probe, once tuned and seen on enough inputs, stays only if the configuration wins at
        least as much as the one before it did; otherwise the old one comes back and the probed
        site waits out a cooldown. True if it reverted."""
        trial = self._trial
        win = self._window_win()
        if win is None:
            return False
        self._trial = None
        if trial is None or trial["win"] is None or win >= trial["win"]:
            return False
        self._block(trial["site"])
        self._reconfigure(trial["sites"], "revert", f"probe of {trial['site']} won {win:.3f} < {trial['win']:.3f} "
                                                    f"before it: back to {list(trial['sites'])}")
        return True

    def _probe_earlier(self, pooled: dict[int, dict[str, float]], at: BudgetPoint | None) -> None:
        cfg, s = self._config, self.settings
        cand = earlier_site(cfg.sites)
        if cand is None or self._blocked(cand) or cand in cfg.sites:
            return
        trial = {"sites": list(cfg.sites), "win": self._window_win(), "site": cand}
        if within_budget(list(cfg.sites) + [cand], self.profile, s, at):
            self._reconfigure(sorted(list(cfg.sites) + [cand]), "add", f"all pay; probe earlier {cand}")
            self._trial = trial
            return
        util = {x: pooled[x]["utility"] for x in cfg.sites}
        victim = (min if s.move_removes == "lowest" else max)(cfg.sites, key=lambda x: (util[x], x))
        new = sorted([x for x in cfg.sites if x != victim] + [cand])
        if within_budget(new, self.profile, s, at):
            self._reconfigure(new, "move", f"all pay; move {victim} -> {cand}")
            self._trial = trial

