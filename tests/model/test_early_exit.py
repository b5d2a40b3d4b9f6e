import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as hst

from apparate.model.early_exit import EarlyExitModel
from apparate.model.ramps import CONFIDENCES, confidence_fn, score
from tests.conftest import SENTENCES


def test_backbone_output_bit_identical(r20_bundle, r20, test_images):
    x = r20.encode([test_images.item(i).input for i in range(16)])
    with torch.no_grad():
        bare = r20.model(x)
    ee = r20_bundle.early_exit_model(active=range(r20_bundle.num_sites))
    try:
        out = ee(x)
        assert torch.equal(out.final, bare)
        assert torch.equal(ee(x, active=()).final, bare)
        assert torch.equal(out.final_pred, bare.argmax(-1))
    finally:
        ee.remove_hooks()
    with torch.no_grad():
        assert torch.equal(r20.model(x), bare)  # hooks gone: the bare model again


def test_callbacks_fire_as_each_ramp_runs(r20_bundle, r20, test_images):
    x = r20.encode([test_images.item(i).input for i in range(4)])
    ee = r20_bundle.early_exit_model(active=[1, 4, 7])
    events = []
    # A hook on a later block shows whether the callback came before the batch moved on.
    later = dict(r20.model.named_modules())["layer3.2"].register_forward_hook(lambda *a: events.append("layer3.2"))
    try:
        out = ee(x, on_ramp=lambda r: events.append(r.site))
        assert events == [1, 4, 7, "layer3.2"]
        assert list(out.ramps) == [1, 4, 7]
        for r in out.ramps.values():
            assert r.conf.shape == (4,) and r.pred.shape == (4,)
            assert np.all((r.conf >= 0) & (r.conf <= 1))
        ee.set_active([0, 8])  # changes at run time, no rebuild
        assert list(ee(x).ramps) == [0, 8]
        ee.set_active([])
        assert ee(x).ramps == {}
    finally:
        later.remove()
        ee.remove_hooks()


def test_only_active_sites_carry_hooks(r20_bundle, r20, test_images):
    x = r20.encode([test_images.item(i).input for i in range(2)])
    modules = dict(r20.model.named_modules())
    hooked = lambda: [s.index for s in r20_bundle.sites if modules[s.name]._forward_hooks]  # noqa: E731
    ee = r20_bundle.early_exit_model(active=[2, 5])
    try:
        assert hooked() == [2, 5]  # inactive sites keep PyTorch's hook-free call path
        seen = []
        ee(x, active=[0, 5], on_ramp=lambda r: seen.append((r.site, hooked())))
        assert seen == [(0, [0, 2, 5]), (5, [0, 2, 5])]  # a one-call override attaches for that call
        assert hooked() == [2, 5]
        ee.set_active([8])
        assert hooked() == [8] and list(ee(x).ramps) == [8]
    finally:
        ee.remove_hooks()
    assert hooked() == []


def test_text_backbone_bit_identical_and_all_layers_report(minilm_base):
    from apparate.model.ramps import RampSpec, build_ramps
    from apparate.model.sites import find_sites

    model, enc = minilm_base
    x = enc(SENTENCES[:6])
    sites = find_sites(model, x)
    ramps = build_ramps([RampSpec("mean", s.shape, 2) for s in sites])
    with torch.no_grad():
        bare = model(**x)
    ee = EarlyExitModel(model, sites, list(ramps), active=range(6), confidence="entropy")
    try:
        out = ee(x)
        assert torch.equal(out.final, bare)
        assert list(out.ramps) == list(range(6))
    finally:
        ee.remove_hooks()


@settings(max_examples=60, deadline=None)
@given(hst.lists(hst.floats(-50, 50), min_size=2, max_size=12))
def test_confidences_in_unit_interval(logits):
    t = torch.tensor([logits])
    for name in CONFIDENCES:
        conf, pred = score(t, confidence_fn(name))
        assert 0.0 <= float(conf) <= 1.0
        assert int(pred) == int(t.argmax())
    probs = torch.softmax(t.float(), -1)
    assert float(CONFIDENCES["margin"](probs)) <= float(CONFIDENCES["max_softmax"](probs)) + 1e-6
    assert float(CONFIDENCES["max_softmax"](probs)) >= 1.0 / len(logits) - 1e-6


def test_unknown_confidence_is_a_clear_error():
    import pytest

    with pytest.raises(ValueError, match="unknown confidence"):
        confidence_fn("vibes")
