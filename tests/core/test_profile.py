import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from apparate.core.profile import LatencyProfile, LatencyTable


def small_profile():
    # 2 batch sizes, 3 sites
    return LatencyProfile(
        batch_sizes=[1, 4],
        site_ms=[[1.0, 2.0, 3.0], [2.0, 5.0, 8.0]],
        ramp_ms=[[0.1, 0.1, 0.2], [0.4, 0.4, 0.8]],
        vanilla_ms=[4.0, 10.0],
        site_names=("a", "b", "c"),
    )


def test_exit_latency_matches_hand_computation():
    t = LatencyTable(site_ms=[1.0, 3.0], ramp_ms=[0.1, 0.2], vanilla_ms=10.0)
    # exit at ramp j: backbone to its site + every active ramp up to and including j
    assert t.exit_ms == pytest.approx([1.1, 3.3])
    # no exit: whole backbone + every active ramp
    assert t.end_ms == pytest.approx(10.3)
    assert t.all_ms == pytest.approx([1.1, 3.3, 10.3])


def test_table_selects_active_sites_in_order():
    p = small_profile()
    t = p.table(1, [0, 2])
    assert t.site_ms == pytest.approx([1.0, 3.0])
    assert t.exit_ms == pytest.approx([1.1, 3.3])
    assert t.end_ms == pytest.approx(4.3)


def test_interpolates_between_batch_sizes_without_rounding_up():
    p = small_profile()
    site, ramp, van = p.at(2)  # a third of the way from 1 to 4, not rounded up to 4
    assert van == pytest.approx(4.0 + (10.0 - 4.0) / 3)
    assert site == pytest.approx([1 + 1 / 3, 3.0, 4 + 2 / 3])
    assert ramp[2] == pytest.approx(0.2 + 0.6 / 3)


def test_extrapolates_linearly_beyond_largest_batch():
    p = small_profile()
    assert p.vanilla(7) == pytest.approx(16.0)


def test_json_round_trip(tmp_path):
    p = small_profile()
    path = tmp_path / "profile.json"
    p.save(path)
    q = LatencyProfile.load(path)
    assert q.site_names == p.site_names
    for bs in (1, 2, 3, 4, 9):
        for a, b in zip(p.at(bs), q.at(bs)):
            assert np.allclose(a, b)
    assert json.loads(path.read_text())["format"] == "apparate.latency_profile/1"


def test_overhead_is_worst_case_share():
    p = small_profile()
    assert p.overhead([0, 2]) == pytest.approx(max(0.3 / 4.0, 1.2 / 10.0))
    assert p.overhead([]) == 0.0


def test_updated_moves_toward_measurement_and_scales_unobserved():
    p = small_profile()
    q = p.updated(4, site_ms={1: 10.0}, ramp_ms={1: 0.8}, vanilla_ms=20.0, weight=1.0)
    site, ramp, van = q.at(4)
    assert site[1] == pytest.approx(10.0)
    assert ramp[1] == pytest.approx(0.8)
    assert van == pytest.approx(20.0)
    assert site[2] > 8.0  # unobserved site follows the observed slow-down
    assert np.all(np.diff(site) >= 0)
    half = p.updated(4, site_ms={1: 10.0}, ramp_ms={}, weight=0.5)
    assert 5.0 < half.at(4)[0][1] < 10.0
    assert p.at(4)[0][1] == pytest.approx(5.0)  # the original is unchanged


@pytest.mark.parametrize("kwargs, msg", [
    (dict(batch_sizes=[4, 1]), "strictly increasing"),
    (dict(site_ms=[[1.0, 0.5, 3.0], [2.0, 5.0, 8.0]]), "must not decrease"),
    (dict(vanilla_ms=[2.0, 10.0]), "exceeds"),
    (dict(ramp_ms=[[0.1, -0.1, 0.2], [0.4, 0.4, 0.8]]), "negative"),
    (dict(site_ms=[[1.0, np.nan, 3.0], [2.0, 5.0, 8.0]]), "NaN"),
])
def test_bad_profiles_raise(kwargs, msg):
    base = dict(batch_sizes=[1, 4], site_ms=[[1.0, 2.0, 3.0], [2.0, 5.0, 8.0]],
                ramp_ms=[[0.1, 0.1, 0.2], [0.4, 0.4, 0.8]], vanilla_ms=[4.0, 10.0])
    with pytest.raises(ValueError, match=msg):
        LatencyProfile(**{**base, **kwargs})


def test_bad_lookups_raise():
    p = small_profile()
    with pytest.raises(ValueError, match="out of range"):
        p.table(1, [0, 3])
    with pytest.raises(ValueError, match="strictly increasing"):
        p.table(1, [2, 0])
    with pytest.raises(ValueError, match="at least 1"):
        p.at(0)
    with pytest.raises(ValueError, match="format"):
        LatencyProfile.from_dict({"format": "something else"})


@settings(max_examples=50, deadline=None)
@given(bs=st.floats(1, 200), sites=st.sets(st.integers(0, 9), max_size=10))
def test_exit_latencies_grow_with_depth(bs, sites):
    p = LatencyProfile.linear(10)
    t = p.table(bs, sorted(sites))
    assert np.all(np.diff(t.all_ms) > 0)
    assert t.end_ms >= t.vanilla_ms


def test_another_preparations_ramps_on_this_backbone_clock():
    a = LatencyProfile.linear(4, vanilla_ms=10.0, ramp_fraction=0.01)
    b = LatencyProfile.linear(4, vanilla_ms=20.0, ramp_fraction=0.03)  # measured on a busier moment
    c = b.with_backbone_of(a)
    assert np.array_equal(c.site_ms, a.site_ms) and np.array_equal(c.vanilla_ms, a.vanilla_ms)
    assert np.allclose(c.site_overheads(1), b.site_overheads(1))  # each ramp's share of a pass is kept
    with pytest.raises(ValueError, match="grid"):
        b.with_backbone_of(LatencyProfile.linear(5))
