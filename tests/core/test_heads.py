"""Heads that keep learning (core/heads.py): causal, guarded, and they do learn a drift."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from apparate.core.heads import HeadLearning, fit_head, head_scores, relearn


def _stream(n: int, d: int, flip_at: int, seed: int = 0):
    """Features whose class is the sign of one coordinate, until `flip_at`, then of another: a
    head fitted before the change is right about half the time after it."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = np.where(np.arange(n) < flip_at, x[:, 0] > 0, x[:, 1] > 0).astype(np.int64)
    w = np.zeros((2, d))
    w[1, 0], w[0, 0] = 4.0, -4.0  # the bootstrap head: the old rule
    return x, y, w, np.zeros(2)


def test_heads_learn_a_drift_and_agreement_rises():
    x, y, w, b = _stream(3000, 6, flip_at=1000)
    conf, pred, log = relearn([x], [(w, b)], y, HeadLearning(every=200, buffer=600, lag=16, loss=0.05))
    _, boot = head_scores(x, w, b)
    late = slice(2000, None)
    assert (boot[late] == y[late]).mean() < 0.6  # the bootstrap head lost the rule
    assert (pred[late, 0] == y[late]).mean() > 0.9  # the learning head found the new one
    assert log.swaps[0] and min(log.swaps[0]) > 1000  # a new head went live only after the change
    # before the first swap, answers are the bootstrap head's
    first = min(log.swaps[0])
    assert np.array_equal(pred[:first, 0], boot[:first])


def test_a_head_that_is_already_right_is_kept():
    x, y, w, b = _stream(1500, 4, flip_at=10**9)
    conf, pred, log = relearn([x], [(w, b)], y, HeadLearning(every=250, lag=0))
    assert log.swaps == [[]]
    assert np.array_equal(pred[:, 0], head_scores(x, w, b)[1])
    assert log.judged[0]  # candidates were trained and judged, and lost


@settings(max_examples=15, deadline=None)
@given(cut=st.integers(300, 1100), lag=st.integers(0, 40), seed=st.integers(0, 5))
def test_answers_never_depend_on_answers_not_known_yet(cut, lag, seed):
    """Changing the final answers from input `cut` on cannot change any site's answer before
    `cut + lag`: a head answering input i was trained and judged on answers known before it."""
    x, y, w, b = _stream(1200, 4, flip_at=500, seed=seed)
    how = HeadLearning(every=100, buffer=400, lag=lag, steps=30)
    c1, p1, log = relearn([x], [(w, b)], y, how)
    assert log.trained[0] and max(log.trained[0]) <= how.buffer  # the buffer's bound holds
    y2 = y.copy()
    y2[cut:] = 1 - y2[cut:]
    c2, p2, _ = relearn([x], [(w, b)], y2, how)
    end = min(cut + lag + 1, 1200)
    assert np.array_equal(p1[:end], p2[:end]) and np.array_equal(c1[:end], c2[:end])


def test_fit_head_warm_start_moves_towards_the_labels_and_l2_holds_it_back():
    x, y, w, b = _stream(800, 5, flip_at=0)
    loose, _ = fit_head(w, b, x, y, l2=0.0, steps=200, lr=0.05)
    tight, _ = fit_head(w, b, x, y, l2=100.0, steps=200, lr=0.05)
    assert (head_scores(x, loose, b)[1] == y).mean() > 0.9
    assert np.abs(tight - w).sum() < np.abs(loose - w).sum()
