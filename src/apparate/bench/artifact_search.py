"""An artifact-style threshold search, for speed comparison only.

The public artifact's search (notes §2.2) is pure Python: every candidate move re-runs the exit
simulation input by input. This is that shape of computation, written from the notes'
description (not the artifact's code), with the same decisions as `core.tuning.greedy_thresholds`
so that both do identical work.
"""

from __future__ import annotations

import numpy as np


def artifact_style_search(conf: np.ndarray, agree: np.ndarray, exit_ms: np.ndarray, target: float,
                          init_step: float = 0.01, min_step: float = 0.001) -> list[float]:
    conf_l, agree_l, lat = conf.tolist(), agree.tolist(), exit_ms.tolist()
    n, R = conf.shape
    allowed = int(np.floor(target * n + 1e-6))

    def evaluate(thr: list[float]) -> tuple[int, float]:
        wrong, total = 0, 0.0
        for c, a in zip(conf_l, agree_l):
            for j in range(R):
                if 1.0 - c[j] < thr[j]:
                    wrong += not a[j]
                    total += lat[j]
                    break
            else:
                total += lat[R]
        return wrong, total

    thr, step = [0.0] * R, [init_step] * R
    wrong, total = evaluate(thr)
    while True:
        best, best_score, moves = None, 0.0, {}
        for r in range(R):
            if thr[r] >= 1:
                continue
            cand = thr[:]
            cand[r] = min(1.0, thr[r] + step[r])
            w2, l2 = evaluate(cand)
            if w2 > allowed:
                continue
            dl, dw = total - l2, w2 - wrong
            if dl > 0 or dw <= 0:
                moves[r] = (w2, l2, dw, dl)
                score = dw / dl if dl > 0 else float("inf")
                if best is None or score < best_score:
                    best, best_score = r, score
        if best is None:
            if not any(s > min_step for s in step):
                return thr
            step = [max(s / 2, min_step) for s in step]
            continue
        w2, l2, _, _ = moves[best]
        thr[best] = min(1.0, thr[best] + step[best])
        wrong, total = w2, l2
        for r, (_, _, dw, dl) in moves.items():
            if r == best or dw == 0 or dl == 0:
                step[r] *= 2
