"""The greedy threshold search's band bookkeeping for small windows, in plain Python lists.

Per ramp, inputs are kept sorted by uncertainty, and the sums over each ramp's band (the inputs
between its threshold and a candidate value) of what moving them to it would change are kept
current by deltas. Below `VECTOR_CUTOFF` elements a loop is plain Python (a numpy call costs
~1-4 us, more than the work); longer ones switch to numpy. The interface (`probe`, `take`,
`exits`) is described in `tuning`; `bands_matrix` is the other engine, for large windows, and
takes the same decisions.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .tuning import Bands

# Loops longer than this switch from plain Python to numpy (a numpy call costs ~1-4 us).
VECTOR_CUTOFF = 96


def list_bands(u_t: np.ndarray, ag_np: np.ndarray, lat_np: np.ndarray, e_a: np.ndarray, cc_a: np.ndarray,
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
