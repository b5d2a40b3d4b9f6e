"""The named policies of the paper's comparison, built from a workload's recordings.

* `vanilla`: no ramps.
* `static`: Apparate's initial configuration (placement on bootstrap data), never adapted.
* `apparate`: the adaptive controller, starting from that configuration, within the user's ramp
  budget.
* `apparate-all`: the same with a ramp budget that admits every candidate ramp at once: the
  paper's comparison setting (§5.3: "support ramps at all layers"), the budget the baselines'
  all-ramps configurations get implicitly.
* `apparate-stop`: `apparate` with early stop: while work waits, inputs released at a ramp leave
  their batch's forward pass (a sampled share runs on, its feedback weighted), so exits also save
  compute (issue 19).
* `branchynet`: light ramps at every site, one shared threshold tuned once.
* `deebert`: DeeBERT-style (pooler) ramps after every encoder layer, one shared threshold.
* `X+`: the same ramps with per-ramp thresholds tuned once (the greedy search).
* `X-opt` / `X+opt`: thresholds tuned on the evaluation stream itself: the best latency with at
  most the accuracy constraint lost, a bound no one-time tuning can beat.
* `branchynet+opt-windows`: as `branchynet+opt`, at the largest loss (within the constraint) at
  which every window of 500 inputs also stays within 1.5x the constraint (98.5% for 1%): the
  hindsight bound that meets the same two checks the reports hold Apparate to.
* `branchynet+opt-budget`: the same, but only ramps that fit the user's ramp budget at the
  serving point: every subset that fits is tuned so, and the one whose median input leaves
  earliest is kept (workloads with at most 12 candidate sites).
* `branchynet+opt-blocks`: the same ramps, per-ramp thresholds tuned in hindsight on each block
  of 500 inputs for that block alone: the oracle of adaptation (what re-tuning thresholds as the
  stream changes could win at most over `branchynet+opt`, in-sample luck included);
  `branchynet+next-block`: each block runs the thresholds tuned on the block before it (the first
  on the bootstrap), with no margin: the same tuning out of sample, what adapting by it keeps.
* `optimal`: each input exits at the earliest site that agrees with the original, ramps free;
  `optimal-cost`: the same with every ramp running and paid for (notes A11).

One-time tuning uses a uniform sample of the workload, as the paper did. Every policy judges
latencies (and Apparate its budget) at the serving point: the batch size (and text length) the
replayed trace gives, `PolicyInputs.serving`; the `opt` variants are tuned on exactly the
inputs replayed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from apparate.core.adjust import BudgetPoint, within_budget
from apparate.core.controller import Config, Controller
from apparate.core.exits import sliding_min_mean
from apparate.core.placement import initial_placement
from apparate.core.profile import LatencyProfile
from apparate.core.recording import Recording
from apparate.core.settings import Settings
from apparate.core.tuning import greedy_thresholds, shared_threshold

from .base import AdaptivePolicy, BlockHindsightPolicy, OraclePolicy, Policy, ThresholdPolicy
from .evidence import LearnedPolicy
from .heads import LiveHeadsPolicy, ReplayedHeadsPolicy, linear_heads


@dataclass(frozen=True, eq=False)
class RampFamily:
    """One kind of candidate ramps on a workload: their data and their costs."""

    bootstrap: Recording  # held-out bootstrap inputs (placement, never the evaluation stream)
    evaluation: Recording  # the stream being replayed
    profile: LatencyProfile

    def __post_init__(self) -> None:
        S = self.profile.num_sites
        for name, rec in (("bootstrap", self.bootstrap), ("evaluation", self.evaluation)):
            if rec.num_sites != S:
                raise ValueError(f"{name} recording has {rec.num_sites} sites but the profile has {S}: "
                                 "they come from different bundles or ramp types")


@dataclass(frozen=True, eq=False)
class PolicyInputs:
    light: RampFamily  # the ramps Apparate and BranchyNet use
    settings: Settings = Settings()
    deebert: RampFamily | None = None  # pooler ramps, NLP only
    heads: RampFamily | None = None  # the light ramps on heads that keep learning (core.heads)
    sample_share: float = 0.1  # uniform sample of the workload for one-time tuning
    seed: int = 0
    serving: BudgetPoint = (1.0, None)  # (batch size, text length) the replay will serve at

    def sample(self, family: RampFamily) -> Recording:
        n = family.evaluation.num_inputs
        k = max(1, int(round(n * self.sample_share)))
        idx = np.sort(np.random.default_rng(self.seed).choice(n, size=min(k, n), replace=False))
        return family.evaluation.take(idx)


def _all_sites_tuned(name: str, family: RampFamily, rec: Recording, inputs: PolicyInputs, per_ramp: bool) -> Policy:
    S = family.profile.num_sites
    sites = list(range(S))
    table = family.profile.table(inputs.serving[0], sites, inputs.serving[1])
    target = inputs.settings.accuracy_constraint
    search = greedy_thresholds if per_ramp else shared_threshold
    res = search(rec.conf, rec.agree, table, target)
    return ThresholdPolicy(name, Config(tuple(sites), tuple(float(t) for t in res.thresholds)))


# Blocks of the adaptation oracle, and the windows `branchynet+opt-windows` checks: the size of
# the worst window the reports check; the windows' floor is this multiple of the constraint.
HINDSIGHT_BLOCK = 500
WINDOW_SLACK = 1.5


def _within_windows(rec: Recording, sites: list[int], table: Any, A: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-ramp thresholds for `sites` tuned in hindsight on `rec` at the largest loss (<= A) at
    which every window of `HINDSIGHT_BLOCK` inputs stays above 1 - WINDOW_SLACK * A; with each
    input's exit latency (ns)."""
    floor = 1.0 - WINDOW_SLACK * A
    conf, agree = rec.conf[:, sites], rec.agree[:, sites]

    def tuned(target: float) -> tuple[Any, bool]:
        res = greedy_thresholds(conf, agree, table, target)
        return res, sliding_min_mean(res.result.correct, HINDSIGHT_BLOCK) >= floor - 1e-12

    best, ok = tuned(A)
    if not ok:  # bisect the loss down to the largest that keeps every window above the floor
        lo, hi = 0.0, A
        best = tuned(0.0)[0]
        for _ in range(12):
            mid = (lo + hi) / 2
            res, ok = tuned(mid)
            lo, hi, best = (mid, hi, res) if ok else (lo, mid, best)
    return best.thresholds, table.all_ns[best.result.exit_index]


def _opt_within_windows(name: str, inputs: PolicyInputs) -> Policy:
    fam = inputs.light
    sites = list(range(fam.profile.num_sites))
    table = fam.profile.table(inputs.serving[0], sites, inputs.serving[1])
    thr, _ = _within_windows(fam.evaluation, sites, table, inputs.settings.accuracy_constraint)
    return ThresholdPolicy(name, Config(tuple(sites), tuple(float(t) for t in thr)))


# `branchynet+opt-budget` tries every subset of ramps that fits the budget: up to 2^12 of them.
BUDGET_SEARCH_SITES = 12


def _opt_within_budget(name: str, inputs: PolicyInputs) -> Policy:
    fam = inputs.light
    S = fam.profile.num_sites
    if S > BUDGET_SEARCH_SITES:
        raise ValueError(f"{name} tries every subset of ramps: at most {BUDGET_SEARCH_SITES} candidate sites, "
                         f"this workload has {S}")
    at, A = inputs.serving, inputs.settings.accuracy_constraint
    best: tuple[float, tuple[int, ...], np.ndarray] | None = None
    for k in range(1, S + 1):
        for sites in itertools.combinations(range(S), k):
            if not within_budget(list(sites), fam.profile, inputs.settings, at):
                continue
            thr, lat = _within_windows(fam.evaluation, list(sites), fam.profile.table(at[0], list(sites), at[1]), A)
            p50 = float(np.median(lat))  # the exit latency of the median input: what the reports rank
            if best is None or p50 < best[0]:
                best = (p50, sites, thr)
    if best is None:
        return ThresholdPolicy(name, Config())
    return ThresholdPolicy(name, Config(best[1], tuple(float(t) for t in best[2])))


def _block_hindsight(lag: int) -> Callable[[str, PolicyInputs], Policy]:
    def build(name: str, inputs: PolicyInputs) -> Policy:
        fam = inputs.light
        S = fam.profile.num_sites
        sites = list(range(S))
        table = fam.profile.table(inputs.serving[0], sites, inputs.serving[1])
        rec, B, target = fam.evaluation, HINDSIGHT_BLOCK, inputs.settings.accuracy_constraint
        thr = []
        for i in range(0, max(rec.num_inputs, 1), B):
            j = i - lag * B  # the block tuned on: this one (hindsight) or the one before
            on = fam.bootstrap if j < 0 else rec.take(slice(j, j + B))
            thr.append(greedy_thresholds(on.conf, on.agree, table, target).thresholds)
        return BlockHindsightPolicy(name, tuple(sites), np.array(thr).reshape(len(thr), S), B)
    return build


def _family(inputs: PolicyInputs, kind: str) -> RampFamily:
    if kind == "deebert":
        if inputs.deebert is None:
            raise ValueError("deebert policies need DeeBERT-style ramps: only NLP workloads record them")
        return inputs.deebert
    return inputs.light


def _baseline(kind: str, per_ramp: bool, on_eval: bool) -> Callable[[str, PolicyInputs], Policy]:
    def build(name: str, inputs: PolicyInputs) -> Policy:
        fam = _family(inputs, kind)
        rec = fam.evaluation if on_eval else inputs.sample(fam)
        return _all_sites_tuned(name, fam, rec, inputs, per_ramp)
    return build


def _static(name: str, inputs: PolicyInputs) -> Policy:
    fam = inputs.light
    place = initial_placement(fam.bootstrap.conf, fam.bootstrap.agree, fam.profile, inputs.settings, inputs.serving)
    return ThresholdPolicy(name, Config(place.sites, place.thresholds))


def all_ramps_budget(profile: LatencyProfile) -> float:
    """A ramp budget that admits every candidate ramp at once, at any batch size."""
    return profile.overhead(range(profile.num_sites)) + 1e-9


def _apparate(all_ramps: bool, learned: bool = False, stop: bool = False) -> Callable[[str, PolicyInputs], Policy]:
    def build(name: str, inputs: PolicyInputs) -> Policy:
        fam = inputs.light
        settings = inputs.settings
        if stop:
            settings = settings.replace(early_stop=True)
        if all_ramps:
            settings = settings.replace(ramp_budget=all_ramps_budget(fam.profile))
        ctl = Controller.from_bootstrap(fam.profile, fam.bootstrap.conf, fam.bootstrap.agree, settings, inputs.serving)
        if learned:
            return LearnedPolicy(name, ctl, fam.bootstrap, settings.seed_window)
        return AdaptivePolicy(name, ctl, settings.stop_share if settings.early_stop else None)
    return build


def _on_heads(build: Callable[[str, PolicyInputs], Policy]) -> Callable[[str, PolicyInputs], Policy]:
    def on_heads(name: str, inputs: PolicyInputs) -> Policy:
        fam = inputs.heads
        if fam is None or fam.evaluation.features is None:
            raise ValueError(f"{name} needs heads that keep learning: a recording with the ramps' features")
        inner = build(name, inputs)
        assert isinstance(inner, AdaptivePolicy)
        return ReplayedHeadsPolicy(name, inner, fam.evaluation)
    return on_heads


POLICIES: dict[str, Callable[[str, PolicyInputs], Policy]] = {
    "vanilla": lambda name, inputs: ThresholdPolicy(name, Config()),
    "static": _static,
    "apparate": _apparate(all_ramps=False),
    "apparate-all": _apparate(all_ramps=True),
    "apparate-learned": _apparate(all_ramps=False, learned=True),
    # with early stop: exited inputs leave their batch while work waits (a sampled share runs on)
    "apparate-stop": _apparate(all_ramps=False, stop=True),
    # on heads that keep learning (core.heads): the server's LiveHeadsPolicy; in replay it needs a
    # recording with the ramps' features (the heads that changed answer from them)
    "apparate+heads": _on_heads(_apparate(all_ramps=False)),
    "branchynet": _baseline("light", per_ramp=False, on_eval=False),
    "branchynet+": _baseline("light", per_ramp=True, on_eval=False),
    "branchynet-opt": _baseline("light", per_ramp=False, on_eval=True),
    "branchynet+opt": _baseline("light", per_ramp=True, on_eval=True),
    "deebert": _baseline("deebert", per_ramp=False, on_eval=False),
    "deebert+": _baseline("deebert", per_ramp=True, on_eval=False),
    "deebert-opt": _baseline("deebert", per_ramp=False, on_eval=True),
    "deebert+opt": _baseline("deebert", per_ramp=True, on_eval=True),
    "branchynet+opt-windows": _opt_within_windows,
    "branchynet+opt-budget": _opt_within_budget,
    "branchynet+opt-blocks": _block_hindsight(lag=0),
    "branchynet+next-block": _block_hindsight(lag=1),
    "optimal": lambda name, inputs: OraclePolicy(name, inputs.light.profile.num_sites, pay_ramps=False),
    "optimal-cost": lambda name, inputs: OraclePolicy(name, inputs.light.profile.num_sites, pay_ramps=True),
}


def family_of(name: str) -> str:
    """Which ramp family a policy runs on: 'deebert', 'heads' (the light ramps, heads that keep
    learning) or 'light'."""
    return "deebert" if name.startswith("deebert") else "heads" if name.endswith("+heads") else "light"


# What a live server can run: the rest need what a server does not have (the evaluation stream in
# advance, every input's true answer, a second preparation of DeeBERT ramps).
SERVABLE = ("vanilla", "static", "apparate", "apparate-all", "apparate-learned", "apparate+heads", "branchynet",
            "branchynet+")
ADAPTIVE = ("apparate", "apparate-all", "apparate-learned", "apparate+heads")


def check_servable(name: str) -> None:
    """ValueError, saying why, unless a live server can run the policy `name`."""
    if name not in SERVABLE:
        why = ("it is tuned on the stream it is evaluated on (hindsight)" if name.endswith("opt") else
               "it is tuned on blocks of the stream it is evaluated on (replay only)" if "block" in name else
               "it is an oracle that knows every answer in advance" if name.startswith("optimal") else
               "its pooler ramps are a separate preparation (replay only)" if name.startswith("deebert") else
               "it is not a policy")
        raise ValueError(f"policy {name!r} cannot be served: {why}; servable: {', '.join(SERVABLE)}")


def serving_policy(name: str, bootstrap: Recording, profile: LatencyProfile, settings: Settings,
                   serving: BudgetPoint = (1.0, None), heads: Any = None) -> Policy:
    """A policy for live serving, built from what a server has: the bundle's bootstrap recording
    (placement, and the one-time baselines' tuning sample: all of it) and its profile;
    `apparate+heads` also the model (`heads`, an EarlyExitModel) whose pool ramps' heads learn."""
    check_servable(name)
    family = RampFamily(bootstrap, bootstrap, profile)
    if name == "apparate+heads":
        if heads is None:
            raise ValueError(f"{name} needs the served model's ramps (their heads learn)")
        inner = make_policy("apparate", PolicyInputs(family, settings, sample_share=1.0, serving=serving))
        assert isinstance(inner, AdaptivePolicy)
        return LiveHeadsPolicy(name, inner, linear_heads(heads))
    return make_policy(name, PolicyInputs(family, settings, sample_share=1.0, serving=serving))


def make_policy(name: str, inputs: PolicyInputs) -> Policy:
    try:
        build = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}") from None
    return build(name, inputs)


def configured_policy(name: str, config: Config, profile: LatencyProfile, settings: Settings,
                      bootstrap: Recording | None = None, heads: Any = None) -> Policy:
    """A servable policy that starts from a given configuration instead of its own placement and
    tuning (an override in experiments and tests, or a checkpoint's configuration whose settings
    changed): an adaptive one gets a controller that starts there with an empty window, keeping
    `bootstrap` to place ramps again should none be left; a fixed one keeps it; vanilla has no
    ramps. `settings` are used as given (for `apparate-all`, the caller's budget). `apparate-learned`
    starts its evidence model empty (the window is empty too)."""
    check_servable(name)
    if name == "apparate+heads":
        if heads is None:
            raise ValueError(f"{name} needs the served model's ramps (their heads learn)")
        inner = configured_policy("apparate", config, profile, settings, bootstrap)
        assert isinstance(inner, AdaptivePolicy)
        return LiveHeadsPolicy(name, inner, linear_heads(heads))
    if name == "vanilla":
        return ThresholdPolicy(name, Config())
    if name in ADAPTIVE:
        boot = None if bootstrap is None else (bootstrap.conf, bootstrap.agree)
        ctl = Controller(profile, settings, config, boot)
        if name == "apparate-learned":
            return LearnedPolicy(name, ctl, bootstrap, seed_window=False)
        return AdaptivePolicy(name, ctl)
    return ThresholdPolicy(name, config)


def restored_policy(name: str, controller: Controller, heads: Any = None) -> Policy:
    """An adaptive policy that goes on from a restored controller (its window, events and
    configuration, `Controller.from_state`). `apparate-learned` gets an empty evidence model level
    with the restored window (a server then restores the checkpoint's fit into it,
    `LearnedPolicy.restore_evidence`; without one, scores are confidences until it refits and the
    window's restored rows keep their scores)."""
    if name not in ADAPTIVE:
        raise ValueError(f"policy {name!r} has no controller to restore; adaptive: {', '.join(ADAPTIVE)}")
    if name == "apparate-learned":
        return LearnedPolicy(name, controller, None, seed_window=False)
    if name == "apparate+heads":  # the bundle's heads; a server then restores the checkpoint's (restore_heads)
        if heads is None:
            raise ValueError(f"{name} needs the served model's ramps (their heads learn)")
        return LiveHeadsPolicy(name, AdaptivePolicy("apparate", controller), linear_heads(heads))
    return AdaptivePolicy(name, controller)
