import numpy as np
import pytest

from apparate.core.adjust import (deeper_site, earlier_site, latest_useful_site, ramp_utilities,
                                  utility_sums, within_budget)
from apparate.core.profile import LatencyProfile, LatencyTable
from apparate.core.settings import Settings


def test_utilities_match_hand_computation():
    # two ramps at 2 ms and 5 ms, each costing 0.5 ms; the model takes 10 ms
    table = LatencyTable(site_ms=[2.0, 5.0], ramp_ms=[0.5, 0.5], vanilla_ms=10.0)
    # exits: L0 = 2.5, L1 = 6.0, end = 11.0
    conf = np.array([[0.99, 0.99],   # exits at 0; could also exit at 1 -> saving 6.0 - 2.5
                     [0.99, 0.50],   # exits at 0; next possible exit is the end -> 11.0 - 2.5
                     [0.50, 0.99],   # exits at 1; saving 11.0 - 6.0
                     [0.50, 0.50]])  # no exit
    thr = np.array([0.05, 0.05])
    sums = utility_sums(conf, thr, table)
    assert sums.savings == pytest.approx([3.5 + 8.5, 5.0])
    # ramp 0 is passed by inputs 3 and 4; ramp 1 by input 4 only
    assert sums.overhead == pytest.approx([2 * 0.5, 1 * 0.5])
    assert sums.released.tolist() == [2, 1]
    assert ramp_utilities(conf, thr, table) == pytest.approx([(12.0 - 1.0) / 4, (5.0 - 0.5) / 4])


def test_a_ramp_that_never_releases_has_negative_utility():
    table = LatencyTable(site_ms=[2.0], ramp_ms=[0.5], vanilla_ms=10.0)
    assert ramp_utilities(np.full((5, 1), 0.6), np.array([0.1]), table)[0] == pytest.approx(-0.5)


def test_latest_useful_site_and_budget():
    p = LatencyProfile(batch_sizes=[1], site_ms=[[2.0, 5.0, 9.5]], ramp_ms=[[0.1, 0.2, 1.0]], vanilla_ms=[10.0])
    assert latest_useful_site(p, 1) == 1  # 9.5 + 1.0 is not faster than 10
    s = Settings(ramp_budget=0.03)
    assert within_budget([0, 1], p, s)  # 0.3 / 10
    assert not within_budget([0, 1, 2], p, s)
    assert not within_budget([0, 1], p, s.replace(max_ramps=1))


def test_where_to_try_next():
    assert deeper_site([2, 5], latest=11) == 8
    assert deeper_site([2, 11], latest=11) is None
    assert deeper_site([], latest=10) == 5
    assert earlier_site([6, 9]) == 2
    assert earlier_site([1]) == 0
    assert earlier_site([0, 3]) is None
