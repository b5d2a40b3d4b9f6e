"""The serving hot path computes exactly what the ramp modules define (up to float rounding)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from apparate.model.ramps import CONFIDENCES, Ramp, RampSpec, confidence_fn, score, scorer, token_weights


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["pool", "conv", "grid", "pool-flat"]), st.integers(1, 5), st.integers(2, 7), st.integers(0, 10_000))
def test_fast_image_ramps_equal_their_modules(kind, batch, classes, seed):
    torch.manual_seed(seed)
    shape = (8,) if kind == "pool-flat" else (8, 6, 6)
    ramp = Ramp(RampSpec(kind.split("-")[0], shape, classes)).eval()
    h = torch.randn(batch, *shape)
    with torch.no_grad():
        assert torch.allclose(ramp.fast()(h, None), ramp(h), atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["mean", "cls", "deebert"]), st.integers(1, 5), st.integers(0, 10_000), st.booleans())
def test_fast_text_ramps_equal_their_modules_with_padding(kind, batch, seed, padded):
    torch.manual_seed(seed)
    ramp = Ramp(RampSpec(kind, (7, 12), 2)).eval()
    h = torch.randn(batch, 7, 12)
    mask = torch.ones(batch, 7, dtype=torch.long)
    if padded:
        lengths = torch.randint(1, 8, (batch,))
        mask = (torch.arange(7)[None, :] < lengths[:, None]).long()
    with torch.no_grad():
        assert torch.allclose(ramp.fast()(h, token_weights(mask)), ramp(h, mask), atol=1e-5)
    assert token_weights(torch.ones(3, 4)) is None  # every token counts: a plain mean


@settings(max_examples=80, deadline=None)
@given(st.lists(st.lists(st.floats(-40, 40), min_size=2, max_size=2), min_size=1, max_size=6)
       | st.lists(st.lists(st.floats(-40, 40), min_size=5, max_size=5), min_size=1, max_size=6),
       st.sampled_from(sorted(CONFIDENCES)))
def test_host_scorer_equals_the_softmax_score(rows, name):
    logits = torch.tensor(rows, dtype=torch.float32)
    fn = confidence_fn(name)
    conf, pred = (np.asarray(v) for v in scorer(fn)(logits))
    ref_conf, ref_pred = score(logits, fn)
    assert conf.shape == pred.shape == (len(rows),)
    assert np.all((conf >= 0) & (conf <= 1))
    assert np.allclose(conf, ref_conf.numpy(), atol=1e-6)
    assert np.array_equal(pred, ref_pred.numpy())


def test_fast_ramps_are_rebuilt_for_new_weights():
    ramp = Ramp(RampSpec("pool", (4, 2, 2), 3)).eval()
    h = torch.randn(2, 4, 2, 2)
    with torch.no_grad():
        for p in ramp.parameters():
            p.copy_(torch.randn_like(p))  # what load_state_dict does
        assert torch.allclose(ramp.fast()(h, None), ramp(h), atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["pool", "conv", "grid", "pool-flat"]), st.integers(1, 5), st.integers(0, 10_000))
def test_a_pool_ramp_hands_over_the_sums_it_pools_bit_for_bit(kind, batch, seed):
    """`fast_with_sums`: a pool ramp's logits exactly as `fast` computes them, and the spatial sums
    exactly as the difference detector pools them alone (`pooled_features`, what recordings keep),
    so a server that reads them decides as its replay. Other ramps have none."""
    from apparate.model.ramp_results import pooled_features

    torch.manual_seed(seed)
    shape = (8,) if kind == "pool-flat" else (8, 6, 6)
    ramp = Ramp(RampSpec(kind.split("-")[0], shape, 3)).eval()
    f = ramp.fast_with_sums()
    if kind != "pool":
        assert f is None
        return
    h = torch.randn(batch, *shape)
    with torch.inference_mode():
        logits, sums = f(h)
        assert torch.equal(logits, ramp.fast()(h, None))
        assert np.array_equal(sums.numpy(), pooled_features(h))
