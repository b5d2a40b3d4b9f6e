"""Initial placement: which ramps to start with, from bootstrap data and the latency profile.

`greedy` (the default) adds, one at a time, the candidate whose addition wins the most tuned
latency per unit of ramp cost on the bootstrap data, while the set stays within the budget, and
stops when no candidate wins anything more. It keeps the positions it found.

`spaced` is the artifact's: the same kind of greedy only decides how many ramps to use (scoring
candidates by utility per cost), then the positions are overwritten by evenly spaced ones over
[0, latest useful site]. Spacing ignores where the data says inputs can exit, so it is the
option, not the default; `apparate bench placement` compares the two on held-out data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .adjust import BudgetPoint, latest_useful_site, ramp_utilities, within_budget
from .exits import check_window
from .profile import LatencyProfile
from .settings import Settings
from .tuning import tune


@dataclass(frozen=True)
class Placement:
    sites: tuple[int, ...]
    thresholds: tuple[float, ...]  # tuned on the bootstrap data
    win: float  # latency win on the bootstrap data, fraction of vanilla
    accuracy: float  # agreement with the original model on the bootstrap data


def _tune(conf, agree, profile, sites, settings, at: BudgetPoint):
    return tune(conf[:, sites], agree[:, sites], profile.table(at[0], sites, at[1]), settings)


def _candidates(profile: LatencyProfile, settings: Settings, at: BudgetPoint, exclude: set[int]) -> list[int]:
    latest = latest_useful_site(profile, *at)
    return [c for c in range(latest + 1) if c not in exclude and within_budget([c], profile, settings, at)]


def place_greedy(conf, agree, profile: LatencyProfile, settings: Settings, at: BudgetPoint,
                 exclude: set[int] = frozenset()) -> Placement:
    conf, agree = check_window(conf, agree)
    chosen: list[int] = []
    best_res = None
    win = 0.0
    costs = profile.site_overheads(*at)
    pool = _candidates(profile, settings, at, exclude)
    while True:
        pick, pick_score, pick_res = None, 0.0, None
        for c in pool:
            if c in chosen or not within_budget(chosen + [c], profile, settings, at):
                continue
            sites = sorted(chosen + [c])
            res = _tune(conf, agree, profile, sites, settings, at)
            gain = res.result.win - win
            if gain <= 1e-12:
                continue
            score = gain  # net of the ramp's cost already: the tuned latencies include it
            if pick is None or score > pick_score:
                pick, pick_score, pick_res = c, score, res
        if pick is None:
            break
        chosen = sorted(chosen + [pick])
        best_res, win = pick_res, pick_res.result.win
    if best_res is None:
        return Placement((), (), 0.0, 1.0)
    return Placement(tuple(chosen), tuple(float(t) for t in best_res.thresholds), float(best_res.result.win),
                     float(best_res.result.accuracy))


def place_spaced(conf, agree, profile: LatencyProfile, settings: Settings, at: BudgetPoint,
                 exclude: set[int] = frozenset()) -> Placement:
    conf, agree = check_window(conf, agree)
    chosen: list[int] = []
    costs = profile.site_overheads(*at)
    pool = _candidates(profile, settings, at, exclude)
    while True:
        pick, pick_score = None, 0.0
        for c in pool:
            if c in chosen or not within_budget(chosen + [c], profile, settings, at):
                continue
            sites = sorted(chosen + [c])
            res = _tune(conf, agree, profile, sites, settings, at)
            table = profile.table(at[0], sites, at[1])
            u = ramp_utilities(conf[:, sites], res.thresholds, table)[sites.index(c)]
            score = u / max(costs[c], 1e-12)
            if score > 0 and (pick is None or score > pick_score):
                pick, pick_score = c, score
        if pick is None:
            break
        chosen.append(pick)
    count = max(len(chosen), 1)
    latest = latest_useful_site(profile, *at)
    if latest < 0:
        return Placement((), (), 0.0, 1.0)
    sites = sorted(set(np.linspace(0, latest, count + 2)[1:-1].astype(int).tolist()) - set(exclude))
    while sites and not within_budget(sites, profile, settings, at):
        sites.pop()
    if not sites:
        return Placement((), (), 0.0, 1.0)
    res = _tune(conf, agree, profile, sites, settings, at)
    return Placement(tuple(sites), tuple(float(t) for t in res.thresholds), float(res.result.win),
                     float(res.result.accuracy))


def initial_placement(conf, agree, profile: LatencyProfile, settings: Settings | None = None,
                      at: BudgetPoint | None = None, exclude: set[int] = frozenset()) -> Placement:
    """Starting ramps and thresholds from bootstrap conf/agree [N, S] over every candidate site
    but `exclude`, with latencies and the ramp budget judged where the model will serve: `at` =
    (batch size, text length), default (`settings.placement_batch_size`, the profile's first)."""
    settings = settings or Settings()
    conf = np.asarray(conf)
    if conf.ndim != 2 or conf.shape[1] != profile.num_sites:
        raise ValueError(f"bootstrap data has shape {conf.shape}; expected [inputs, {profile.num_sites}] sites")
    at = (float(at[0]), at[1]) if at is not None else (float(settings.placement_batch_size), None)
    place = place_greedy if settings.placement == "greedy" else place_spaced
    return place(conf, agree, profile, settings, at, set(exclude))
