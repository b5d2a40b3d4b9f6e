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

`grid_thresholds` (exhaustive over a grid) and `shared_threshold` (one threshold for all ramps)
are the searches the baselines use.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from .calibration import isotonic_agreement
from .exits import ExitResult, check_thresholds, check_window, first_exit, simulate
from .profile import LatencyTable
from .settings import Settings

# Loops longer than this switch from plain Python to numpy (a numpy call costs ~1-4 us).
VECTOR_CUTOFF = 96
# Windows larger than this (inputs x ramps) keep their bands in matrices (see `_matrix_bands`).
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
# bookkeeping reads correctness only when it starts, so it updates the exits alone). Two implementations that take the same
# decisions: plain lists with incremental sums for small windows (a numpy call costs ~1-4 us,
# more than the work), and prefix-sum matrices for large ones (a move updates every ramp's view
# of the moved inputs in one vectorised step).

Bands = tuple[Callable[[list[int], list[float]], tuple[list[int], list[int]]], Callable[[int], None],
              Callable[[], np.ndarray]]


def _list_bands(u_t: np.ndarray, ag_np: np.ndarray, lat_np: np.ndarray, e_a: np.ndarray, cc_a: np.ndarray,
                thr: list[float], order: np.ndarray) -> Bands:
    R, n = u_t.shape
    lat = lat_np.tolist()
    ag = ag_np.tolist()
    cl_a = lat_np[e_a]
    e, cc, cl = e_a.tolist(), cc_a.tolist(), cl_a.tolist()  # exit, right?, latency per input
    rows = np.arange(R)[:, None]
    ords = order.tolist()
    us = u_t[rows, order].tolist()
    # Rank of each input in each ramp's order: built on first use (not every search moves).
    pos_cache: list[np.ndarray] = []
    pos_rows: list[list[int] | None] = [None] * R

    def pos_all() -> np.ndarray:
        if not pos_cache:
            p = np.empty_like(order)
            p[rows, order] = np.arange(n)
            pos_cache.append(p)
        return pos_cache[0]

    def pos_of(r: int) -> list[int]:
        row = pos_rows[r]
        if row is None:
            row = pos_rows[r] = pos_all()[r].tolist()
        return row

    lo = [bisect_left(us[r], thr[r]) for r in range(R)]  # inputs already below the threshold

    # Per ramp, the sums over its band [lo, hi) of what moving those inputs to the ramp would
    # change: wrong answers (bw) and latency won (bl). Kept current by deltas: moving a band
    # edge adds or removes the segment between, and a move elsewhere adjusts by each moved
    # input's change in contribution. The arrays e_a, cc_a, cl_a mirror e, cc, cl for the
    # vectorised paths taken when a loop would be long.
    hi_of = lo[:]
    bw = [0] * R
    bl = [0] * R

    pending: list[tuple[list[int], int]] = []  # moves not yet mirrored into e_a, cc_a, cl_a

    def sync() -> None:
        for moved, r in pending:
            M = np.asarray(moved)
            e_a[M], cc_a[M], cl_a[M] = r, ag_np[r, M], lat[r]
        pending.clear()

    def set_hi(r: int, hi: int) -> None:
        """Move ramp r's band edge to `hi`, adding or removing the segment in between."""
        h0 = hi_of[r]
        a_, b_, sign = (h0, hi, 1) if hi > h0 else (hi, h0, -1)
        if b_ - a_ > VECTOR_CUTOFF:
            sync()
            o = order[r, a_:b_]
            o = o[e_a[o] > r]
            sw, sl = int((cc_a[o] - ag_np[r, o]).sum()), int((cl_a[o] - lat[r]).sum())
        else:
            a, L = ag[r], lat[r]
            sw = sl = 0
            for m in ords[r][a_:b_]:
                if e[m] > r:
                    sw += cc[m] - a[m]
                    sl += cl[m] - L
        bw[r] += sign * sw
        bl[r] += sign * sl
        hi_of[r] = hi

    def shift_bands(moved: list[int], chosen: int) -> None:
        """Adjust every other band for inputs that now exit at `chosen`."""
        a, L = ag[chosen], lat[chosen]
        if len(moved) * R > VECTOR_CUTOFF:
            sync()
            M = np.asarray(moved)
            P = pos_all()[:, M]
            inband = (P >= np.asarray(lo)[:, None]) & (P < np.asarray(hi_of)[:, None])
            inband[chosen] = False
            old = (e_a[M][None, :] > rows) & inband
            new = (chosen > rows) & inband
            agr = ag_np[:, M]
            dsw = (new * (ag_np[chosen, M][None, :] - agr)).sum(1) - (old * (cc_a[M][None, :] - agr)).sum(1)
            dsl = (new.sum(1) * L - old @ cl_a[M]) - (new.sum(1) - old.sum(1)) * lat_np[:R]
            for r in range(R):
                bw[r] += int(dsw[r])
                bl[r] += int(dsl[r])
            return
        for r in range(R):
            if r == chosen or hi_of[r] <= lo[r]:
                continue
            pr, lr, hr, ar, Lr = pos_of(r), lo[r], hi_of[r], ag[r], lat[r]
            dsw = dsl = 0
            for m in moved:
                if lr <= pr[m] < hr:
                    if e[m] > r:  # remove the old contribution
                        dsw -= cc[m] - ar[m]
                        dsl -= cl[m] - Lr
                    if chosen > r:  # add the new one
                        dsw += a[m] - ar[m]
                        dsl += L - Lr
            bw[r] += dsw
            bl[r] += dsl

    def probe(ramps: list[int], values: list[float]) -> tuple[list[int], list[int]]:
        ws, ls = [], []
        for r, v in zip(ramps, values):
            h = bisect_left(us[r], v, lo[r])
            if h != hi_of[r]:
                set_hi(r, h)
            ws.append(bw[r])
            ls.append(bl[r])
        return ws, ls

    def take(chosen: int) -> None:
        a, L = ag[chosen], lat[chosen]
        moved = [m for m in ords[chosen][lo[chosen]:hi_of[chosen]] if e[m] > chosen]
        lo[chosen] = hi_of[chosen]
        bw[chosen] = bl[chosen] = 0
        if moved:
            shift_bands(moved, chosen)
            for m in moved:
                e[m], cc[m], cl[m] = chosen, a[m], L
            pending.append((moved, chosen))

    return probe, take, lambda: np.array(e, dtype=np.int64)


_SHIFT = 22  # packed band sums: wrong-answer changes in the low bits, signed
_HALF = 1 << (_SHIFT - 1)
_MASK = (1 << _SHIFT) - 1


def _matrix_bands(u_t: np.ndarray, ag_np: np.ndarray, lat_np: np.ndarray, e_a: np.ndarray, cc_a: np.ndarray,
                  thr: list[float], order: np.ndarray) -> Bands:
    R, n = u_t.shape
    w = n + 1  # row width: each ramp's inputs in its order, then a zero (a band may end at n)
    rows = np.arange(R)[:, None]
    u_t = np.ascontiguousarray(u_t)
    flat = order + rows * n  # flat index of (r, input at rank j of ramp r's order)
    # Search keys r + i*u: numpy orders complex numbers by real part, then imaginary, so one
    # searchsorted finds every ramp's band edge exactly (no rounding: both parts are kept).
    keys = np.empty((R, n), dtype=np.complex128)
    keys.real, keys.imag = rows, u_t.reshape(-1)[flat]  # (int + complex arithmetic is ~20x slower)
    keys = keys.reshape(-1)
    r_f = np.arange(R, dtype=np.float64)
    e, cc = e_a, cc_a
    lat = lat_np.tolist()
    lat_r = lat_np[:R, None]
    # WG[0, r * w + j] and WG[1, r * w + j]: what moving the j-th input in ramp r's order to ramp
    # r would change in wrong answers and in latency (zero for inputs that already exit at r or
    # earlier). A band's sums are one `add.reduceat` over its run of a row, for every probed
    # ramp at once; a move rewrites only the moved inputs' entries (no prefix sums to redo: a
    # move used to recompute all of them). Integer sums: exact in any order.
    fresh = bool(n) and e.min() == R and cc.min() == cc.max()  # nothing exits yet (no fixed ramps):
    # every input is movable everywhere, from the end and with the same correctness: no gathers
    w_bound = n * int(max(ag_np.max(initial=0), -ag_np.min(initial=0), cc.max(initial=0), -cc.min(initial=0)))
    l_bound = n * int(lat_np.max(initial=0) - lat_np.min(initial=0))  # |latency change| <= spread
    # One reduceat instead of two where every band sum fits: an entry packs its latency change
    # (high bits) and its wrong-answer change (low bits, signed); sums of packed entries are the
    # packed sums, exactly (integers; the bounds above rule out overflow).
    packed = w_bound < _HALF and l_bound < (1 << (62 - _SHIFT))
    ag_o = ag_np.reshape(-1)[flat]  # agreement in each ramp's order
    if packed:
        PK = np.zeros((R, w), dtype=np.int64)
        if fresh:
            # one pass: (latency change << shift) + correctness, per ramp, minus each agreement
            np.subtract(((lat_np[R] - lat_r) << _SHIFT) + cc[0], ag_o, out=PK[:, :n])
        else:
            e_o = e[order]
            PK[:, :n] = np.where(e_o > rows, ((lat_np[e_o] - lat_r) << _SHIFT) + (cc[order] - ag_o), 0)
        PK = PK.reshape(-1)
        WG = W0 = W1 = None
    else:
        WG = np.zeros((2, R, w), dtype=np.int64)
        if fresh:
            np.subtract(cc[0], ag_o, out=WG[0, :, :n])
            WG[1, :, :n] = lat_np[R] - lat_r
        else:
            e_o = e[order]
            movable = e_o > rows
            WG[0, :, :n] = np.where(movable, cc[order] - ag_o, 0)
            WG[1, :, :n] = np.where(movable, lat_np[e_o] - lat_r, 0)
        WG = WG.reshape(2, R * w)
        W0, W1 = WG[0], WG[1]
        PK = None
    pos = np.empty_like(order)
    pos.reshape(-1)[flat] = rows * w + np.arange(n)  # pos[r, m] = r * w + rank of m in r's order
    r_w = np.arange(R) * w
    r_n = np.arange(R) * n
    wn = r_w - r_n  # from a flat key index (r * n + edge) to a flat WG index (r * w + edge)
    # Band starts and ends as flat indices into WG's rows: [lo, hi) of ramp r is
    # [lo_w[r], hi_w[r]) (inputs already below the threshold start the band).
    lo_w = np.searchsorted(keys, r_f + 1j * np.asarray(thr)) + wn
    hi_w = lo_w.copy()
    order_w = np.zeros((R, w), dtype=np.int64)  # order in WG's layout (the last column unused)
    order_w[:, :n] = order
    order_w = order_w.reshape(-1)

    # The probed ramps as an index array, kept while the same ramps are probed (they change only
    # when a level halves fewer of them or a ramp reaches 1): one numpy call less per probe.
    probed: list = [None, None, None, None]  # [ramps, as an array, their key base (r + 0j), wn]
    key_base = r_f + 0j
    # [c, r]: the packed latency change of moving an input from ramp c to ramp r (see `take`).
    lat_shift = (lat_np[:R, None] - lat_np[None, :R]) << _SHIFT

    def probe(ramps: list[int], values: list[float]) -> tuple[list[int], list[int]]:
        if probed[0] != ramps:  # ascending: the runs [lo, hi) are in order along the flat rows
            r_a = np.array(ramps)
            probed[:] = [list(ramps), r_a, key_base[r_a], wn[r_a]]
        r_a, key = probed[1], probed[2].copy()
        key.imag = values
        h = keys.searchsorted(key)
        h += probed[3]  # band ends, flat
        hi_w[r_a] = h
        start = lo_w[r_a]
        edges = np.empty(2 * r_a.size, dtype=np.int64)
        edges[0::2], edges[1::2] = start, h
        if packed:
            # An empty band reads one entry: it is masked below, in Python (a dozen ramps cost
            # less as Python ints than as three more numpy calls).
            zs = np.add.reduceat(PK, edges)[0::2].tolist()
            ws, ls = [], []
            for z, a_, b_ in zip(zs, start.tolist(), h.tolist()):
                if a_ == b_:
                    ws.append(0)
                    ls.append(0)
                else:
                    low = ((z + _HALF) & _MASK) - _HALF
                    ws.append(low)
                    ls.append((z - low) >> _SHIFT)
            return ws, ls
        sums = np.add.reduceat(WG, edges, axis=1)[:, 0::2]
        sums *= h > start
        return sums.tolist()  # type: ignore[return-value]  # [wrong changes, latency changes]

    def take(chosen: int) -> None:
        a_, b_ = int(lo_w[chosen]), int(hi_w[chosen])
        lo_w[chosen] = b_
        band = order_w[a_:b_]
        moved = band[e[band] > chosen]
        if not moved.size:
            return
        e[moved] = chosen
        # Every ramp's view of the moved inputs: ramps before `chosen` could still take them
        # (now from `chosen`, with its agreement), the others no longer can.
        a = ag_np[chosen, moved]
        P = pos[:, moved]
        P0, P1 = P[:chosen], P[chosen:]
        if packed:
            PK[P0] = lat_shift[chosen, :chosen, None] - ag_np[:chosen, moved] + a
            PK[P1] = 0
        else:
            W0[P0] = a - ag_np[:chosen, moved]
            W1[P0] = lat[chosen] - lat_r[:chosen]
            W0[P1] = 0
            W1[P1] = 0

    return probe, take, lambda: e


_BANDS = {"lists": _list_bands, "matrix": _matrix_bands}


def tune(conf: np.ndarray, agree: np.ndarray, table: LatencyTable, settings: Settings,
         fixed: Mapping[int, float] | None = None) -> TuneResult:
    """The greedy search as the control loops run it: target, steps and calibration from settings."""
    conf, agree = _check_inputs(conf, agree, table)
    order = np.argsort(conf, axis=0)  # one sort serves the calibration and the search
    prob = (isotonic_agreement(conf, agree, settings.agreement_prior, order=order)
            if settings.agreement == "isotonic" else None)
    return greedy_thresholds(conf, agree, table, settings.tuning_target(conf.shape[0]), fixed=fixed,
                             init_step=settings.init_step, min_step=settings.min_step, agree_prob=prob,
                             conf_order=order)


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
