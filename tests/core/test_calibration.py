import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from apparate.core.calibration import smooth_agreement
from apparate.core.synthetic import synthetic_window


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(1, 4), st.integers(0, 1000), st.integers(1, 64), st.floats(0, 5))
def test_smoothed_agreement_is_a_probability_non_decreasing_in_confidence(n, r, seed, b, prior):
    conf, agree = synthetic_window(n, r, seed)
    p = smooth_agreement(conf, agree, b, prior)
    assert p.shape == conf.shape and np.all((p >= 0) & (p <= 1))
    for j in range(r):
        order = np.argsort(conf[:, j], kind="stable")
        assert np.all(np.diff(p[order, j]) >= -1e-12)


def test_one_bin_without_prior_is_the_mean():
    conf, agree = synthetic_window(100, 2, seed=4)
    p = smooth_agreement(conf, agree, bin_size=1000, prior=0.0)
    assert np.allclose(p, agree.mean(axis=0))


def test_bad_arguments():
    with pytest.raises(ValueError):
        smooth_agreement(np.ones((3, 1)), np.ones((3, 1), bool), bin_size=0)
