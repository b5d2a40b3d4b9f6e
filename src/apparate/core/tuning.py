"""Accuracy-aware threshold tuning.

`greedy_thresholds` is the search of the paper's artifact (notes §2.2): a coordinate-wise hill
climb over per-ramp thresholds with multiplicative steps. Each round tries raising every ramp's
threshold by its step and takes the feasible move that loses the least accuracy per unit of
latency won; a taken step doubles, and when no move is feasible every step halves, until all
steps are at the minimum. Differences from the artifact, on purpose:

* ramp 0 can be the best direction (the artifact's truthiness test treated it as "none");
* accuracy lost is signed, so a move that also fixes answers ranks best (the artifact used |.|);
* a move that loses accuracy without winning latency is never taken;
* feasibility is "wrong answers <= target * N" on integer counts, and latencies are compared in
  integer nanoseconds, so the search is exact and deterministic whatever the summation order.

The implementation is exact but incremental: per ramp, inputs are kept sorted by uncertainty, so
raising a threshold touches only the band of inputs between the old and new value, and all the
halving rounds that would find nothing are folded into one evaluation. The plain version that
re-simulates every candidate lives in the tests as the oracle this one must match move for move.

The band bookkeeping has two engines that take the same decisions: `bands_list` (plain lists,
small windows) and `bands_matrix` (numpy matrices, large ones); `greedy_thresholds` picks one.

`grid_thresholds` (exhaustive over a grid) and `shared_threshold` (one threshold for all ramps)
are the searches the baselines use.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from .calibration import isotonic_agreement
from .exits import ExitResult, check_thresholds, check_window, first_exit, simulate
from .profile import LatencyTable
from .settings import Settings
from .bands_list import list_bands
from .bands_matrix import matrix_bands

# Windows larger than this (inputs x ramps) keep their bands in matrices (`bands_matrix`).
MATRIX_CUTOFF = 1024


@dataclass(frozen=True, eq=False)
class TuneResult:
    thresholds: np.ndarray  # [R]
    result: ExitResult  # the thresholds applied to the window they were tuned on
    rounds: int = 0  # evaluation rounds the search used


# Agreement probabilities are counted in integer milli-units, so the search stays exact.
PROB_UNITS = 1000


def allowed_wrong(target: float, n: int, units: int = 1) -> int:
    """How many released answers (in `units` per answer) may differ from the original's."""
    if not 0 <= target <= 1:
        raise ValueError(f"accuracy target (loss) must be in [0, 1], got {target}")
    return int(np.floor(target * n * units + 1e-6))


def _check_inputs(conf, agree, table: LatencyTable) -> tuple[np.ndarray, np.ndarray]:
    conf, agree = check_window(conf, agree)
    if table.num_ramps != conf.shape[1]:
        raise ValueError(f"latency table has {table.num_ramps} ramps but the window has {conf.shape[1]}")
    return conf, agree


def greedy_thresholds(
    conf: np.ndarray,
    agree: np.ndarray,
    table: LatencyTable,
    target: float,
    fixed: Mapping[int, float] | None = None,
    init_step: float = 0.01,
    min_step: float = 0.001,
    max_rounds: int = 100_000,
    agree_prob: np.ndarray | None = None,
    method: str = "auto",
    conf_order: np.ndarray | None = None,
) -> TuneResult:
    """Per-ramp thresholds that win the most latency with at most `target` accuracy loss.

    conf, agree: [N, R] for the active ramps in site order. `fixed` maps ramp positions (0..R-1)
    to thresholds that are kept as they are (the partial re-tune of offending ramps).
    `agree_prob` [N, R], if given, replaces 0/1 agreement in the search by probabilities (see
    `calibration.isotonic_agreement`); the returned result is still measured on `agree`.
    `method` picks the band bookkeeping ("lists" for small windows, "matrix" for large ones,
    "auto" by size); both take the same decisions. `conf_order`, if given, is
    `np.argsort(conf, axis=0)` already computed (the calibration sorts the same window).
    """
    conf, agree = _check_inputs(conf, agree, table)
    if not 0 < min_step <= init_step:
        raise ValueError(f"need 0 < min_step <= init_step, got {min_step}, {init_step}")
    n, R = conf.shape
    if method == "auto":
        method = "matrix" if n * R > MATRIX_CUTOFF else "lists"
    if method not in _BANDS:
        raise ValueError(f"method must be auto, lists or matrix, got {method!r}")
    if agree_prob is None:
        units = 1
        ag_np = agree.T.astype(np.int64)
    else:
        p = np.asarray(agree_prob, dtype=np.float64)
        if p.shape != conf.shape or np.isnan(p).any() or (p.size and (p.min() < 0 or p.max() > 1)):
            raise ValueError(f"agree_prob must be [N, R] = {conf.shape} probabilities in [0, 1]")
        units = PROB_UNITS
        ag_np = np.rint(p.T * units).astype(np.int64)
    allowed = allowed_wrong(target, n, units)
    thr = [0.0] * R
    searchable = [True] * R
    for r, t in (fixed or {}).items():
        if not 0 <= r < R:
            raise ValueError(f"fixed ramp {r} out of range 0..{R - 1}")
        thr[r] = float(t)
        searchable[r] = False

    u_t = 1.0 - conf.T  # [R, N] uncertainty
    lat_np = table.all_ns
    if fixed:
        e_a = first_exit(u_t.T, check_thresholds(thr, R))
        cc_a = np.append(ag_np, np.full((1, n), units, dtype=np.int64), axis=0)[e_a, np.arange(n)]
    else:  # nothing exits yet: every answer is the original's, at the end
        e_a = np.full(n, R, dtype=np.int64)
        cc_a = np.full(n, units, dtype=np.int64)
    wrong = n * units - int(cc_a.sum())
    if conf_order is None:
        conf_order = np.argsort(conf, axis=0)
    elif conf_order.shape != conf.shape:
        raise ValueError(f"conf_order must be [N, R] = {conf.shape}, got {conf_order.shape}")
    # Per ramp, inputs by rising uncertainty: by falling confidence (ties in any order: a band
    # takes all equal values or none).
    order = np.ascontiguousarray(conf_order.T[:, ::-1])
    probe_bands, take, exits = _BANDS[method](u_t, ag_np, lat_np, e_a, cc_a, thr, order)
    step = [float(init_step)] * R
    cand_v, cand_s = [0.0] * R, [0.0] * R  # each ramp's last probed value and step (this round)

    rounds = 0
    while rounds < max_rounds:
        rounds += 1
        live = [r for r in range(R) if searchable[r] and thr[r] < 1.0]
        if not live:
            break
        # Level k = the artifact's k-th halving round; the first level with a move wins. The
        # bands follow the levels down, so they are exactly the next round's bands.
        k, chosen = 0, -1
        probe = live
        while True:
            scale = 0.5 ** k
            shrinking = []  # ramps whose step can still halve; the others stay as probed
            values = []
            for r in probe:
                s = step[r] * scale
                if s <= min_step:
                    s = min_step
                else:
                    shrinking.append(r)
                v = thr[r] + s
                if v > 1.0:
                    v = 1.0
                cand_v[r] = v
                cand_s[r] = s
                values.append(v)
            best_r, best_score, best_dw, neutral_r, neutral_dw = -1, 0.0, 0, -1, 0
            free: list[int] = []
            for r, dw, dl in zip(probe, *probe_bands(probe, values)):
                if wrong + dw > allowed:
                    continue
                if dl > 0:
                    score = dw / dl
                    if best_r < 0 or score < best_score:
                        best_r, best_score, best_dw = r, score, dw
                    if dw == 0:
                        free.append(r)
                elif dw <= 0:
                    if neutral_r < 0:
                        neutral_r, neutral_dw = r, dw
                    free.append(r)
            chosen, chosen_dw = (best_r, best_dw) if best_r >= 0 else (neutral_r, neutral_dw)
            if chosen >= 0 or not shrinking:
                break
            probe = shrinking
            k += 1
        if chosen < 0:
            break
        # Apply: steps as after k halvings, the move, then the doublings (free holds each ramp
        # at most once).
        for r in live:
            step[r] = cand_s[r]
        thr[chosen] = cand_v[chosen]
        take(chosen)
        wrong += chosen_dw  # what the move changes in wrong answers: its band's sum, as probed
        for r in free:
            step[r] *= 2.0
        if chosen not in free:
            step[chosen] *= 2.0

    thr_out = np.array(thr, dtype=np.float64)
    e_out = exits()
    correct = np.append(agree.T, np.ones((1, n), dtype=bool), axis=0)[e_out, np.arange(n)]
    result = ExitResult(exit_index=e_out, correct=correct,
                        latency_ms=table.all_ms[e_out], vanilla_ms=table.vanilla_ms, num_ramps=R)
    return TuneResult(thresholds=thr_out, result=result, rounds=rounds)


# Band bookkeeping. Per ramp r, inputs are kept sorted by uncertainty; the ramp's band is the
# inputs between its threshold and a candidate threshold, [lo, hi) in that order. The search asks
# `probe(ramps, values)`: for each ramp, what moving its band to it would change (wrong answers
# dw, latency won dl); `take(r)` moves ramp r's band (the last probed: its dw is what the move
# changes in wrong answers); `exits()` gives each input's exit. Both take ownership of the exit
# and correctness arrays they are given (`e_a`, `cc_a`) and update them in place (the matrix
# bookkeeping reads correctness only when it starts, so it updates the exits alone). Two
# implementations that take the same decisions: plain lists with incremental sums for small
# windows (`bands_list.list_bands`: a numpy call costs ~1-4 us, more than the work), and matrices
# of each input's change, summed per band in one call, for large ones
# (`bands_matrix.matrix_bands`: a move updates every ramp's view of the moved inputs in one
# vectorised step).

Bands = tuple[Callable[[list[int], list[float]], tuple[list[int], list[int]]], Callable[[int], None],
              Callable[[], np.ndarray]]


_BANDS: dict[str, Callable[..., Bands]] = {"lists": list_bands, "matrix": matrix_bands}


def tune(conf: np.ndarray, agree: np.ndarray, table: LatencyTable, settings: Settings,
         fixed: Mapping[int, float] | None = None, evidence: float | None = None) -> TuneResult:
    """The greedy search as the control loops run it: target, steps and calibration from settings.
    `evidence`: how many independent inputs the rows are worth, for the margin (default their
    number; less when rows are repeated by their sampling weights, `Window.weighted_rows`)."""
    conf, agree = _check_inputs(conf, agree, table)
    target = settings.tuning_target(conf.shape[0] if evidence is None else evidence)
    if settings.thresholds == "shared" and not fixed:
        return shared_threshold(conf, agree, table, target)
    order = np.argsort(conf, axis=0)  # one sort serves the calibration and the search
    if settings.thresholds == "level" and not fixed:  # the level always reads calibrated agreement
        return level_threshold(conf, agree, isotonic_agreement(conf, agree, settings.agreement_prior, order=order),
                               table, target)
    prob = (isotonic_agreement(conf, agree, settings.agreement_prior, order=order)
            if settings.agreement == "isotonic" else None)
    return greedy_thresholds(conf, agree, table, target, fixed=fixed,
                             init_step=settings.init_step, min_step=settings.min_step, agree_prob=prob,
                             conf_order=order)


def level_threshold(conf: np.ndarray, agree: np.ndarray, prob: np.ndarray, table: LatencyTable,
                    target: float) -> TuneResult:
    """One level on the calibrated probability of agreement, as per-ramp thresholds.

    `prob` [N, R] is P(agree | confidence) per ramp, non-decreasing in confidence
    (`isotonic_agreement`). The exact shared search picks the level (an input leaves at the first
    ramp where 1 - prob < level) with the most latency won within `target`, counting wrong answers
    on 0/1 agreement; each ramp's threshold is then the raw-confidence cutoff that releases exactly
    the same window inputs. One parameter is estimated, so its estimation error shrinks as fast as
    a single threshold's, while the calibration gives each ramp its own offset.
    """
    conf, agree = _check_inputs(conf, agree, table)
    prob = np.asarray(prob, dtype=np.float64)
    if prob.shape != conf.shape:
        raise ValueError(f"prob must be [N, R] = {conf.shape}, got {prob.shape}")
    # a confidence of 0 never passes a threshold (1 - 0 < t <= 1 is false), so it never leaves
    prob = np.where(conf > 0, prob, 0.0)
    level = shared_threshold(prob, agree, table, target).thresholds
    R = conf.shape[1]
    thr = np.zeros(R)
    for r in range(R):
        out = (1.0 - prob[:, r]) < level[r]
        if out.any():
            # the least confident input released: every input at least as confident is released too
            thr[r] = min(float(np.nextafter(1.0 - conf[out, r].min(), 2.0)), 1.0)
    return TuneResult(thresholds=thr, result=simulate(conf, agree, thr, table, validate=False), rounds=1)


def _best_feasible(conf, agree, table: LatencyTable, candidates: np.ndarray, target: float, chunk: int = 4096) -> TuneResult:
    """Evaluate candidate threshold vectors [C, R]; keep the lowest mean latency within target.

    Ties go to the earliest candidate. All-zero thresholds (no exits) are always feasible, so
    callers include them to guarantee an answer.
    """
    n, R = conf.shape
    allowed = allowed_wrong(target, n)
    u = 1.0 - conf
    lat = table.all_ns
    agree_end = np.concatenate([agree, np.ones((n, 1), dtype=bool)], axis=1)
    best, best_lat = None, None
    for start in range(0, len(candidates), chunk):
        c = candidates[start:start + chunk]  # [C, R]
        fires = u[None, :, :] < c[:, None, :]  # [C, N, R]
        idx = np.where(fires.any(axis=2), fires.argmax(axis=2), R)  # [C, N]
        wrong = n - agree_end[np.arange(n)[None, :], idx].sum(axis=1)
        total = lat[idx].sum(axis=1)
        total = np.where(wrong <= allowed, total, np.iinfo(np.int64).max)
        i = int(np.argmin(total))
        if total[i] != np.iinfo(np.int64).max and (best_lat is None or total[i] < best_lat):
            best, best_lat = c[i].copy(), total[i]
    assert best is not None, "candidates must include an always-feasible point"
    return TuneResult(thresholds=best, result=simulate(conf, agree, best, table, validate=False),
                      rounds=len(candidates))


def grid_thresholds(
    conf: np.ndarray,
    agree: np.ndarray,
    table: LatencyTable,
    target: float,
    grid: np.ndarray | None = None,
    max_points: int = 2_000_000,
) -> TuneResult:
    """Exhaustive search over a threshold grid per ramp (the "opt" baselines). Cost: |grid|^R."""
    conf, agree = _check_inputs(conf, agree, table)
    g = np.linspace(0.0, 1.0, 21) if grid is None else np.unique(np.asarray(grid, dtype=np.float64))
    check_thresholds(g, g.size)
    if g[0] != 0.0:
        g = np.insert(g, 0, 0.0)
    R = conf.shape[1]
    if g.size ** R > max_points:
        raise ValueError(f"grid of {g.size}^{R} points exceeds max_points={max_points}; "
                         "use a coarser grid or greedy_thresholds")
    cands = np.array(list(itertools.product(g, repeat=R)), dtype=np.float64).reshape(-1, R)
    return _best_feasible(conf, agree, table, cands, target, chunk=max(1, 2_000_000 // max(conf.size, 1)))


def shared_threshold(
    conf: np.ndarray,
    agree: np.ndarray,
    table: LatencyTable,
    target: float,
    grid: np.ndarray | None = None,
) -> TuneResult:
    """The best single threshold applied to every ramp (BranchyNet/DeeBERT-style tuning), exact.

    As a shared threshold t rises, an input's exit moves earlier exactly when t passes one of
    its prefix-minimum uncertainties (the first ramp with 1 - conf < t is the first whose
    running minimum is below t). One sorted sweep over those events gives the wrong-answer count
    and total latency at every distinct t; the best feasible one wins. With `grid`, only those
    thresholds are considered.
    """
    conf, agree = _check_inputs(conf, agree, table)
    n, R = conf.shape
    allowed = allowed_wrong(target, n)
    lat = table.all_ns
    if R == 0:
        return TuneResult(np.zeros(0), simulate(conf, agree, np.zeros(0), table, validate=False))
    u = 1.0 - conf
    run_min = np.minimum.accumulate(u, axis=1)
    record = np.ones((n, R), dtype=bool)  # ramps where the running minimum strictly drops
    record[:, 1:] = run_min[:, 1:] < run_min[:, :-1]
    record &= run_min < 1.0  # uncertainty 1 (confidence 0) never passes a threshold <= 1
    rows, cols = np.nonzero(record)
    vals = u[rows, cols]
    # For an input, the exit before passing record k is the next deeper record (or the end).
    nxt = np.full(rows.size, R)
    same = rows[1:] == rows[:-1]
    nxt[:-1][same] = cols[1:][same]
    agree_end = np.concatenate([agree, np.ones((n, 1), dtype=bool)], axis=1).astype(np.int64)
    d_wrong = agree_end[rows, nxt] - agree_end[rows, cols]
    d_lat = lat[cols] - lat[nxt]
    order = np.argsort(vals, kind="stable")
    vals, d_wrong, d_lat = vals[order], d_wrong[order], d_lat[order]
    # Candidate thresholds: 0 and just above each event value (ties apply together).
    cand_t = np.concatenate([[0.0], np.minimum(np.nextafter(vals, 2.0), 1.0)])
    wrong = np.concatenate([[0], np.cumsum(d_wrong)])
    total = lat[R] * n + np.concatenate([[0], np.cumsum(d_lat)])
    # Thresholds equal to or below a later event value must not count it: keep the last event of
    # each run of equal values.
    last_of_run = np.ones(cand_t.size, dtype=bool)
    last_of_run[1:-1] = vals[1:] != vals[:-1]
    if grid is not None:
        g = np.unique(np.concatenate([[0.0], np.asarray(grid, dtype=np.float64)]))
        check_thresholds(g, g.size)
        k = np.searchsorted(vals, g, side="left")  # events with value < t
        cand_t, wrong, total = g, wrong[k], total[k]
    else:
        cand_t, wrong, total = cand_t[last_of_run], wrong[last_of_run], total[last_of_run]
    ok = wrong <= allowed
    best = int(np.flatnonzero(ok)[np.argmin(total[ok])])
    thr = np.full(R, cand_t[best])
    return TuneResult(thresholds=thr, result=simulate(conf, agree, thr, table, validate=False), rounds=cand_t.size)
