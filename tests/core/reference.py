"""Plain re-implementations used as oracles: slow, obviously correct, one candidate at a time."""

from __future__ import annotations

import numpy as np

from apparate.core.exits import simulate
from apparate.core.tuning import allowed_wrong


def reference_greedy(conf, agree, table, target, fixed=None, init_step=0.01, min_step=0.001):
    """The artifact's greedy search (notes §2.2) with the documented fixes, one `simulate` per
    candidate move and one halving per round."""
    n, R = conf.shape
    allowed = allowed_wrong(target, n)
    lat = table.all_ns
    thr = np.zeros(R)
    step = np.full(R, float(init_step))
    searchable = np.ones(R, dtype=bool)
    for r, t in (fixed or {}).items():
        thr[r] = t
        searchable[r] = False

    def evaluate(t):
        res = simulate(conf, agree, t, table, validate=False)
        return int(n - res.correct.sum()), int(lat[res.exit_index].sum())

    wrong, total = evaluate(thr)
    while True:
        useful, neutral, free = [], [], []
        for r in range(R):
            if not searchable[r] or thr[r] >= 1:
                continue
            cand = thr.copy()
            cand[r] = min(1.0, thr[r] + step[r])
            w2, l2 = evaluate(cand)
            if w2 > allowed:
                continue
            dl, dw = total - l2, w2 - wrong
            if dl > 0:
                useful.append((dw / dl, r, w2, l2))
            elif dw <= 0:
                neutral.append((r, w2, l2))
            if (dl > 0 or dw <= 0) and (dw == 0 or dl == 0):
                free.append(r)
        if useful:
            _, r, w2, l2 = min(useful, key=lambda x: (x[0], x[1]))
        elif neutral:
            r, w2, l2 = neutral[0]
        else:
            can = (step > min_step) & (thr < 1) & searchable
            if not can.any():
                break
            step[can] = np.maximum(step[can] / 2, min_step)
            continue
        thr[r] = min(1.0, thr[r] + step[r])
        wrong, total = w2, l2
        for f in set(free) | {r}:
            step[f] *= 2
    return thr
