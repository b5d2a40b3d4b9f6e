import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from apparate.core.exits import simulate
from apparate.core.profile import LatencyProfile
from apparate.core.synthetic import synthetic_window
from apparate.core.calibration import isotonic_agreement
from apparate.core.settings import Settings
from apparate.core.tuning import (PROB_UNITS, allowed_wrong, greedy_thresholds, grid_thresholds, level_threshold,
                                  shared_threshold, tune)

from .reference import reference_greedy


def table_for(R, bs=8):
    return LatencyProfile.linear(R).table(bs, list(range(R)))


# Realistic windows (easiness-driven) and adversarial ones (coarse values -> many ties).
def windows(max_n=120, max_r=5):
    real = st.builds(lambda n, r, seed, d: synthetic_window(n, r, seed, d),
                     st.integers(1, max_n), st.integers(1, max_r), st.integers(0, 10_000), st.floats(-0.3, 0.3))
    coarse = st.builds(lambda n, r, seed: (np.random.default_rng(seed).integers(0, 21, (n, r)) / 20,
                                           np.random.default_rng(seed + 1).uniform(size=(n, r)) < 0.8),
                       st.integers(1, max_n), st.integers(1, max_r), st.integers(0, 10_000))
    return st.one_of(real, coarse)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(windows(), st.sampled_from([0.0, 0.005, 0.02, 0.1]))
def test_greedy_matches_the_plain_reference_move_for_move(w, target):
    conf, agree = w
    table = table_for(conf.shape[1])
    slow = reference_greedy(conf, agree, table, target)
    for method in ("lists", "matrix"):  # both band bookkeepings take the same decisions
        assert np.array_equal(greedy_thresholds(conf, agree, table, target, method=method).thresholds, slow)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(200, 400), st.integers(3, 6), st.integers(0, 1000))
def test_greedy_matches_reference_on_larger_windows(n, r, seed):
    # large enough to take the vectorised paths for long bands and many moved inputs
    conf, agree = synthetic_window(n, r, seed)
    table = table_for(r)
    slow = reference_greedy(conf, agree, table, 0.01)
    for method in ("lists", "matrix"):
        assert np.array_equal(greedy_thresholds(conf, agree, table, 0.01, method=method).thresholds, slow)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(windows(max_n=80, max_r=4), st.sampled_from([0.0, 0.02]))
def test_matrix_bands_match_reference_when_sums_are_too_large_to_pack(w, target):
    # Latencies of hours in ns: the matrix bookkeeping keeps wrong answers and latency apart
    # (its packed single-sum path would overflow) and must decide exactly as the reference.
    conf, agree = w
    table = LatencyProfile.linear(conf.shape[1], vanilla_ms=3.6e7).table(8, list(range(conf.shape[1])))
    assert conf.shape[0] * int(table.all_ns.max()) >= 1 << 40
    slow = reference_greedy(conf, agree, table, target)
    assert np.array_equal(greedy_thresholds(conf, agree, table, target, method="matrix").thresholds, slow)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(windows(max_r=4), st.data())
def test_fixed_ramps_keep_their_thresholds_and_match_reference(w, data):
    conf, agree = w
    R = conf.shape[1]
    r = data.draw(st.integers(0, R - 1))
    t = data.draw(st.sampled_from([0.0, 0.05, 0.3]))
    table = table_for(R)
    slow = reference_greedy(conf, agree, table, 0.02, fixed={r: t})
    for method in ("lists", "matrix"):
        fast = greedy_thresholds(conf, agree, table, 0.02, fixed={r: t}, method=method).thresholds
        assert fast[r] == t
        assert np.array_equal(fast, slow)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(windows(), st.sampled_from([0.0, 0.003, 0.01, 0.05]))
def test_tuned_thresholds_meet_the_target_on_their_window(w, target):
    conf, agree = w
    table = table_for(conf.shape[1])
    res = greedy_thresholds(conf, agree, table, target)
    again = simulate(conf, agree, res.thresholds, table)
    assert (~again.correct).sum() <= allowed_wrong(target, conf.shape[0])
    assert np.array_equal(again.exit_index, res.result.exit_index)
    assert np.all((res.thresholds >= 0) & (res.thresholds <= 1))


def test_easy_data_exits_at_first_ramp_and_hard_data_never_exits():
    conf = np.full((50, 3), 0.999)
    table = table_for(3)
    res = greedy_thresholds(conf, np.ones((50, 3), bool), table, 0.0)
    assert (res.result.exit_index == 0).all()
    res = greedy_thresholds(conf, np.zeros((50, 3), bool), table, 0.0)
    assert (res.result.exit_index == 3).all() and res.result.accuracy == 1.0


def test_probabilities_of_zero_and_one_give_the_same_search_as_booleans():
    conf, agree = synthetic_window(150, 4, seed=3)
    table = table_for(4)
    a = greedy_thresholds(conf, agree, table, 0.01).thresholds
    b = greedy_thresholds(conf, agree, table, 0.01, agree_prob=agree.astype(float)).thresholds
    assert np.array_equal(a, b)


def test_probabilities_are_counted_as_expected_errors():
    # every input agrees with probability 0.99: each exit costs 0.01 expected errors
    conf = np.full((100, 1), 0.99)
    table = table_for(1)
    p = np.full((100, 1), 0.99)
    res = greedy_thresholds(conf, np.ones((100, 1), bool), table, 0.005, agree_prob=p)
    assert res.thresholds[0] <= 0.01 + 1e-12  # exiting all 100 would cost 1.0 > 0.5 allowed
    res = greedy_thresholds(conf, np.ones((100, 1), bool), table, 0.01, agree_prob=p)
    assert (res.result.exit_index == 0).all()  # 100 * 10 units <= 0.01 * 100 * PROB_UNITS
    assert PROB_UNITS == 1000


def brute_force(conf, agree, table, target, grid):
    best, best_t = None, None
    for t in itertools.product(grid, repeat=conf.shape[1]):
        res = simulate(conf, agree, np.array(t), table)
        if (~res.correct).sum() <= allowed_wrong(target, conf.shape[0]):
            total = table.all_ns[res.exit_index].sum()
            if best is None or total < best:
                best, best_t = total, np.array(t)
    return best_t, best


@settings(max_examples=30, deadline=None)
@given(windows(max_n=40, max_r=2), st.sampled_from([0.0, 0.05]))
def test_grid_search_finds_the_brute_force_optimum(w, target):
    conf, agree = w
    grid = np.linspace(0, 1, 6)
    table = table_for(conf.shape[1])
    res = grid_thresholds(conf, agree, table, target, grid=grid)
    _, best = brute_force(conf, agree, table, target, grid)
    assert table.all_ns[res.result.exit_index].sum() == best


@settings(max_examples=50, deadline=None)
@given(windows(max_n=60, max_r=4), st.sampled_from([0.0, 0.02, 0.1]))
@example((np.array([[0.0, 0.35]]), np.array([[True, False]])), 0.0)  # confidence 0 never exits
def test_shared_threshold_is_exact_optimum_over_single_thresholds(w, target):
    conf, agree = w
    table = table_for(conf.shape[1])
    res = shared_threshold(conf, agree, table, target)
    assert np.all(res.thresholds == res.thresholds[0])
    assert (~res.result.correct).sum() <= allowed_wrong(target, conf.shape[0])
    # no single threshold (at any distinct uncertainty boundary) does better
    u = np.unique(np.concatenate([[0.0], np.minimum(np.nextafter(1 - conf.ravel(), 2), 1.0)]))
    best = min(table.all_ns[simulate(conf, agree, np.full(conf.shape[1], t), table).exit_index].sum()
               for t in u if (~simulate(conf, agree, np.full(conf.shape[1], t), table).correct).sum()
               <= allowed_wrong(target, conf.shape[0]))
    assert table.all_ns[res.result.exit_index].sum() == best


def test_grid_refuses_an_explosive_grid():
    conf, agree = synthetic_window(10, 8)
    with pytest.raises(ValueError, match="max_points"):
        grid_thresholds(conf, agree, table_for(8), 0.01)


@pytest.mark.parametrize("kwargs, msg", [
    (dict(target=-0.1), "accuracy target"),
    (dict(target=0.01, fixed={5: 0.1}), "out of range"),
    (dict(target=0.01, min_step=0.0), "min_step"),
    (dict(target=0.01, agree_prob=np.full((10, 2), 1.5)), "agree_prob"),
    (dict(target=0.01, method="fast"), "method"),
])
def test_tuning_rejects_bad_arguments(kwargs, msg):
    conf, agree = synthetic_window(10, 2)
    with pytest.raises(ValueError, match=msg):
        greedy_thresholds(conf, agree, table_for(2), **kwargs)


def test_tuning_rejects_table_of_wrong_size():
    conf, agree = synthetic_window(10, 2)
    with pytest.raises(ValueError, match="latency table"):
        greedy_thresholds(conf, agree, table_for(3), 0.01)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(windows(max_n=200, max_r=5), st.integers(0, 10_000))
def test_a_shared_sort_with_ties_in_any_order_gives_the_same_calibration_and_search(w, seed):
    # `tune` sorts the window once for the calibration and the search; any order of equal
    # confidences must give the same fit and the same thresholds as each sorting for itself.
    from apparate.core.calibration import isotonic_agreement
    from apparate.core.settings import Settings
    from apparate.core.tuning import tune

    conf, agree = w
    table = table_for(conf.shape[1])
    tiebreak = np.random.default_rng(seed).uniform(size=conf.shape)
    order = np.lexsort((tiebreak, conf), axis=0)  # ascending confidence, ties shuffled
    own = isotonic_agreement(conf, agree, 4.0)
    assert np.array_equal(isotonic_agreement(conf, agree, 4.0, order=order), own)
    slow = reference_greedy(conf, agree, table, 0.02)  # the oracle sorts nothing: it re-simulates
    for method in ("lists", "matrix"):
        got = greedy_thresholds(conf, agree, table, 0.02, method=method, conf_order=order).thresholds
        assert np.array_equal(got, slow)
        want = greedy_thresholds(conf, agree, table, 0.02, agree_prob=own, method=method).thresholds
        got = greedy_thresholds(conf, agree, table, 0.02, agree_prob=own, method=method, conf_order=order).thresholds
        assert np.array_equal(got, want)
    s = Settings()
    want = greedy_thresholds(conf, agree, table, s.tuning_target(conf.shape[0]), init_step=s.init_step,
                             min_step=s.min_step, agree_prob=own).thresholds
    assert np.array_equal(tune(conf, agree, table, s).thresholds, want)


def test_a_sort_of_the_wrong_shape_is_refused():
    from apparate.core.calibration import isotonic_agreement

    conf, agree = synthetic_window(50, 3, 0)
    bad = np.argsort(conf[:40], axis=0)
    with pytest.raises(ValueError, match="order"):
        isotonic_agreement(conf, agree, order=bad)
    with pytest.raises(ValueError, match="conf_order"):
        greedy_thresholds(conf, agree, table_for(3), 0.01, conf_order=bad)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(windows(max_n=150, max_r=5), st.sampled_from([0.0, 0.01, 0.05]), st.sampled_from([0.0, 4.0]))
def test_one_level_on_calibrated_agreement_releases_what_the_level_releases(w, target, prior):
    conf, agree = w
    table = table_for(conf.shape[1])
    prob = isotonic_agreement(conf, agree, prior)
    res = level_threshold(conf, agree, prob, table, target)
    prob = np.where(conf > 0, prob, 0.0)  # confidence 0 never leaves, whatever its calibration
    # the raw thresholds release, at every ramp, exactly the window inputs the level releases there
    level = shared_threshold(prob, agree, table, target).thresholds
    for r in range(conf.shape[1]):
        assert np.array_equal(1.0 - conf[:, r] < res.thresholds[r], 1.0 - prob[:, r] < level[r])
    # so the exits, the wrong answers and the latency are the level's, within the target
    assert np.array_equal(res.result.exit_index, simulate(conf, agree, res.thresholds, table).exit_index)
    assert (~res.result.correct).sum() <= allowed_wrong(target, conf.shape[0])
    same = simulate(prob, agree, level, table)
    assert np.array_equal(res.result.exit_index, same.exit_index)


def test_threshold_shapes_through_the_tuner_as_the_loops_call_it():
    conf, agree = synthetic_window(600, 4, 3)
    table = table_for(4)
    one = Settings(thresholds="shared", margin_z=0.0)
    assert np.array_equal(tune(conf, agree, table, one).thresholds, shared_threshold(conf, agree, table, 0.01).thresholds)
    lvl = tune(conf, agree, table, Settings(thresholds="level", margin_z=0.0)).thresholds
    assert len(set(lvl)) > 1  # one level, but each ramp its own cutoff in confidence
    # a partial re-tune (some ramps fixed) is the per-ramp search whatever the shape
    fixed = {0: 0.05}
    assert np.array_equal(tune(conf, agree, table, Settings(thresholds="level"), fixed=fixed).thresholds,
                          tune(conf, agree, table, Settings(), fixed=fixed).thresholds)
    with pytest.raises(ValueError, match="thresholds must be per-ramp, shared or level"):
        Settings(thresholds="median")
