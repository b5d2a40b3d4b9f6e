import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from apparate.core.calibration import isotonic_agreement, tuning_target
from apparate.core.exits import simulate
from apparate.core.profile import LatencyProfile
from apparate.core.settings import Settings
from apparate.core.synthetic import synthetic_window
from apparate.core.tuning import greedy_thresholds, tune


def pav_reference(conf: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Textbook pool-adjacent-violators on one ramp, inputs of equal confidence grouped first."""
    values, group = np.unique(conf, return_inverse=True)
    blocks: list[list[float]] = []  # [sum, count, groups]
    for g in range(values.size):
        members = y[group == g].astype(float)
        blocks.append([members.sum(), float(members.size), 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, k, m = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += k
            blocks[-1][2] += m
    per_group = np.concatenate([np.full(m, s / k) for s, k, m in blocks])
    return per_group[group]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(1, 4), st.integers(0, 1000), st.floats(0, 20), st.booleans())
def test_isotonic_agreement_is_a_probability_non_decreasing_in_confidence(n, r, seed, prior, coarse):
    conf, agree = synthetic_window(n, r, seed)
    if coarse:  # many ties in confidence
        conf = np.round(conf, 1)
    p = isotonic_agreement(conf, agree, prior)
    assert p.shape == conf.shape and np.all((p >= -1e-12) & (p <= 1 + 1e-12))
    for j in range(r):
        order = np.argsort(conf[:, j], kind="stable")
        assert np.all(np.diff(p[order, j]) >= -1e-12)
        for value in np.unique(conf[:, j]):  # equal confidence, equal estimate
            assert np.ptp(p[conf[:, j] == value, j]) <= 1e-12


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 200), st.integers(1, 3), st.integers(0, 1000), st.booleans())
def test_without_prior_it_is_exactly_the_isotonic_regression(n, r, seed, coarse):
    conf, agree = synthetic_window(n, r, seed)
    if coarse:
        conf = np.round(conf, 1)
    p = isotonic_agreement(conf, agree, prior=0.0)
    for j in range(r):
        assert np.allclose(p[:, j], pav_reference(conf[:, j], agree[:, j]), atol=1e-12)


def test_a_perfect_run_is_trusted_only_as_far_as_its_size():
    conf = np.linspace(0.5, 1.0, 40)[:, None]
    agree = np.ones((40, 1), dtype=bool)
    agree[:4] = False  # the 4 least confident disagree: mean agreement 0.9
    p = isotonic_agreement(conf, agree, prior=4.0)
    assert p[-1, 0] == pytest.approx((36 + 4 * 0.9) / 40)  # the agreeing block, shrunk toward 0.9
    assert p[0, 0] == pytest.approx((0 + 4 * 0.9) / 8)


def test_tuning_target_spends_more_of_the_constraint_on_larger_windows():
    a = 0.01
    targets = [tuning_target(a, n, 3.0) for n in (64, 256, 1024, 10**7)]
    assert all(x < y for x, y in zip(targets, targets[1:])) and targets[-1] == pytest.approx(a, abs=1e-4)
    for n, z in ((1024, 3.0), (256, 1.0), (50, 2.0)):  # its upper confidence bound is the constraint
        t = tuning_target(a, n, z)
        assert t + z * np.sqrt(t * (1 - t) / n) == pytest.approx(a, rel=1e-9)
    assert tuning_target(a, 1024, 0.0) == a and tuning_target(a, 0, 3.0) == 0.0
    with pytest.raises(ValueError):
        tuning_target(a, 100, -1.0)
    with pytest.raises(ValueError):
        isotonic_agreement(np.ones((3, 1)), np.ones((3, 1), bool), prior=-1)


def test_calibrated_tuning_keeps_fresh_inputs_within_the_constraint_near_the_best_tradeoff():
    """Tuned on 1,024-input windows, the thresholds meet the constraint on fresh inputs of the same
    distribution, and win nearly as much latency as thresholds tuned on 40x the data for the same
    loss (the margin trades win for safety, it wastes little); raw 0/1 agreement, tuned on the
    same windows without a margin, breaks the constraint out of sample."""
    R = 5
    table = LatencyProfile.linear(R, ramp_fraction=0.005).table(1, list(range(R)))
    s = Settings()
    fresh = synthetic_window(40_000, R, seed=999)
    ours, raw = [], []
    for seed in range(12):
        c, a = synthetic_window(1024, R, seed=seed)
        for kind, z, out in (("isotonic", s.margin_z, ours), ("raw", 0.0, raw)):
            res = tune(c, a, table, s.replace(agreement=kind, margin_z=z))
            ev = simulate(*fresh, res.thresholds, table)
            out.append((1 - ev.accuracy, ev.win))
    loss, win = np.mean(ours, axis=0)
    assert 0 < loss <= s.accuracy_constraint
    ideal = simulate(*fresh, greedy_thresholds(*fresh, table, loss).thresholds, table).win
    assert win >= 0.9 * ideal
    assert np.mean(raw, axis=0)[0] > s.accuracy_constraint
