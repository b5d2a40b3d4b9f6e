import numpy as np
import pytest

from apparate.core.placement import initial_placement
from apparate.core.profile import LatencyProfile
from apparate.core.settings import Settings
from apparate.core.synthetic import synthetic_recording


@pytest.mark.parametrize("how", ["greedy", "spaced"])
@pytest.mark.parametrize("budget", [0.0, 0.005, 0.02, 0.2])
def test_placement_stays_within_budget(how, budget):
    prof = LatencyProfile.linear(12, ramp_fraction=0.004)
    rec = synthetic_recording(600, 12, seed=2)
    s = Settings(placement=how, ramp_budget=budget)
    place = initial_placement(rec.conf, rec.agree, prof, s)
    assert prof.overhead(place.sites) <= budget + 1e-12
    assert list(place.sites) == sorted(set(place.sites))
    assert len(place.thresholds) == len(place.sites)
    if budget == 0.0:
        assert place.sites == ()


def test_greedy_wins_latency_on_exitable_data_but_not_on_useless_ramps():
    prof = LatencyProfile.linear(12, ramp_fraction=0.004)
    rec = synthetic_recording(600, 12, seed=2)
    place = initial_placement(rec.conf, rec.agree, prof, Settings())
    assert place.sites and place.win > 0.1
    assert 1 - place.accuracy <= Settings().accuracy_constraint
    # ramps that never agree can only spend the error budget on a handful of inputs
    useless = initial_placement(rec.conf, np.zeros_like(rec.agree), prof, Settings())
    assert useless.win < 0.01
    assert 1 - useless.accuracy <= Settings().tuning_target(600)


def test_placement_rejects_data_of_the_wrong_width():
    prof = LatencyProfile.linear(12)
    rec = synthetic_recording(50, 8)
    with pytest.raises(ValueError, match="12"):
        initial_placement(rec.conf, rec.agree, prof)
