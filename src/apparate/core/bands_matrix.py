"""The greedy threshold search's band bookkeeping for large windows, in numpy matrices.

For each ramp and each input in the ramp's order of uncertainty, a matrix entry holds what
moving that input to the ramp would change (wrong answers, latency; packed into one integer
where the sums fit). A band's sums are one `add.reduceat` for every probed ramp at once; a move
rewrites only the moved inputs' entries. The interface (`probe`, `take`, `exits`) is described
in `tuning`; `bands_list` is the other engine, for small windows, and takes the same decisions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .tuning import Bands

_SHIFT = 22  # packed band sums: wrong-answer changes in the low bits, signed
_HALF = 1 << (_SHIFT - 1)
_MASK = (1 << _SHIFT) - 1


def matrix_bands(u_t: np.ndarray, ag_np: np.ndarray, lat_np: np.ndarray, e_a: np.ndarray, cc_a: np.ndarray,
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
