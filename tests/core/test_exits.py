import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from apparate.core.exits import simulate
from apparate.core.profile import LatencyTable

TABLE3 = LatencyTable(site_ms=[1.0, 2.0, 3.0], ramp_ms=[0.1, 0.1, 0.1], vanilla_ms=5.0)


def test_first_confident_ramp_releases():
    conf = np.array([[0.99, 0.99, 0.99],   # exits at ramp 0
                     [0.50, 0.95, 0.99],   # ramp 1
                     [0.50, 0.50, 0.50]])  # final output
    agree = np.array([[True, True, True], [True, False, True], [False, False, False]])
    res = simulate(conf, agree, [0.05, 0.1, 0.0], TABLE3)
    assert res.exit_index.tolist() == [0, 1, 3]
    assert res.correct.tolist() == [True, False, True]  # the final output always agrees
    assert res.latency_ms == pytest.approx([1.1, 2.2, 5.3])
    assert res.accuracy == pytest.approx(2 / 3)
    assert res.exit_rates == pytest.approx([1 / 3, 1 / 3, 0, 1 / 3])
    assert res.win == pytest.approx((5.0 - np.mean([1.1, 2.2, 5.3])) / 5.0)


def test_zero_threshold_never_exits():
    conf = np.ones((4, 3))
    res = simulate(conf, np.ones((4, 3), bool), [0, 0, 0], TABLE3)
    assert (res.exit_index == 3).all() and res.accuracy == 1.0


window = st.integers(1, 40).flatmap(lambda n: st.integers(1, 5).flatmap(lambda r: st.tuples(
    arrays(np.float64, (n, r), elements=st.floats(0, 1)),
    arrays(np.bool_, (n, r)),
    arrays(np.float64, (r,), elements=st.floats(0, 1)),
)))


@settings(max_examples=200, deadline=None)
@given(window, st.data())
def test_raising_a_threshold_never_lowers_that_ramps_exit_count(w, data):
    conf, agree, thr = w
    r = data.draw(st.integers(0, conf.shape[1] - 1))
    higher = thr.copy()
    higher[r] = data.draw(st.floats(thr[r], 1))
    table = LatencyTable(np.arange(1, conf.shape[1] + 1), np.full(conf.shape[1], 0.1), conf.shape[1] + 1)
    before = (simulate(conf, agree, thr, table).exit_index == r).sum()
    after = (simulate(conf, agree, higher, table).exit_index == r).sum()
    assert after >= before


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 50), st.integers(1, 6), st.floats(0.01, 1))
def test_confident_agreeing_inputs_all_exit_at_the_first_ramp(n, r, t):
    conf = np.full((n, r), 1.0)
    table = LatencyTable(np.arange(1, r + 1), np.zeros(r), r + 1)
    res = simulate(conf, np.ones((n, r), bool), np.full(r, t), table)
    assert (res.exit_index == 0).all()
    assert res.accuracy == 1.0
    assert res.exit_rates[0] == 1.0


@settings(max_examples=100, deadline=None)
@given(window)
def test_exit_rates_sum_to_one_and_latency_within_bounds(w):
    conf, agree, thr = w
    R = conf.shape[1]
    table = LatencyTable(np.arange(1, R + 1), np.full(R, 0.1), R + 1)
    res = simulate(conf, agree, thr, table)
    assert res.exit_rates.sum() == pytest.approx(1.0)
    assert res.latency_ms.min() >= table.all_ms.min() and res.latency_ms.max() <= table.end_ms


@pytest.mark.parametrize("conf, agree, thr, msg", [
    (np.ones((2, 3)), np.ones((2, 3), bool), [0.1, -0.1, 0.1], "thresholds must lie in"),
    (np.ones((2, 3)), np.ones((2, 3), bool), [0.1, 0.1], "thresholds for 3 ramps"),
    (np.ones((2, 3)), np.ones((3, 3), bool), [0.1] * 3, "agree has shape"),
    (np.ones((0, 3)), np.ones((0, 3), bool), [0.1] * 3, "empty"),
    (np.array([[np.nan, 1, 1]]), np.ones((1, 3), bool), [0.1] * 3, "NaN"),
    (np.array([[1.5, 1, 1]]), np.ones((1, 3), bool), [0.1] * 3, r"\[0, 1\]"),
    (np.ones(3), np.ones(3, bool), [0.1] * 3, "2-d"),
    (np.ones((1, 3)), np.full((1, 3), 2), [0.1] * 3, "booleans"),
    (np.ones((1, 3)), np.ones((1, 3), bool), [np.nan] * 3, "NaN"),
])
def test_bad_arguments_raise_clear_errors(conf, agree, thr, msg):
    with pytest.raises(ValueError, match=msg):
        simulate(conf, agree, thr, TABLE3)


def test_table_ramp_count_must_match():
    with pytest.raises(ValueError, match="latency table has 3 ramps"):
        simulate(np.ones((2, 2)), np.ones((2, 2), bool), [0.1, 0.1], TABLE3)
