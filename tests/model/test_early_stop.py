"""Rows dropped between sites (early stop): the rest of the batch gets exactly the answers the full
batch gives, on a CNN and on a text encoder with padding; a batch whose rows all left stops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hst
from torch import nn

from apparate.model.early_exit import EarlyExitModel, drop_rows_work
from apparate.model.sites import primary_output
from tests.conftest import SENTENCES


def dropping(plan: dict[int, set[int]]):
    """A callback that drops, at each site in `plan`, the ORIGINAL rows listed there (those still
    present); records each ramp's rows."""
    seen: dict[int, np.ndarray] = {}

    def on_ramp(r):
        rows = np.arange(r.logits.shape[0]) if r.rows is None else r.rows
        seen[r.site] = rows.copy()
        out = plan.get(r.site)
        if not out:
            return None
        return ~np.isin(rows, sorted(out))

    return on_ramp, seen


def check_same_answers(full, cut, sites, atol=1e-4):
    """`cut` (a call with drops) answers its remaining rows as `full` (the same batch, no drops)."""
    rows = np.arange(primary_output(full.final).shape[0]) if cut.rows is None else cut.rows
    ref, got = primary_output(full.final)[rows], primary_output(cut.final)
    assert got.shape == ref.shape
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert torch.allclose(got, ref, rtol=1e-3, atol=atol)
    assert torch.equal(cut.final_pred, full.final_pred[rows])
    for s in sites:
        r = cut.ramps[s]
        at = np.arange(primary_output(full.final).shape[0]) if r.rows is None else r.rows
        assert np.array_equal(r.pred, full.ramps[s].pred[at])
        assert np.allclose(r.logits.float(), full.ramps[s].logits.float()[at], rtol=1e-3, atol=atol)


@pytest.fixture(scope="module")
def r20_ee(r20_bundle):
    ee = r20_bundle.early_exit_model()
    yield ee
    ee.remove_hooks()


@pytest.fixture(scope="module")
def r20_batch(r20, test_images):
    return r20.encode([test_images.item(i).input for i in range(8)])


def test_cnn_dropped_rows_leave_the_rest_unchanged(r20_ee, r20_batch):
    sites = (1, 4, 7)
    full = r20_ee(r20_batch, active=sites)
    assert full.rows is None and all(r.rows is None for r in full.ramps.values())  # no drop: nothing changes
    on_ramp, seen = dropping({1: {0, 3}, 4: {5}})
    cut = r20_ee(r20_batch, on_ramp=on_ramp, active=sites)
    assert cut.rows.tolist() == [1, 2, 4, 6, 7]
    assert seen[1].tolist() == list(range(8)) and seen[4].tolist() == [1, 2, 4, 5, 6, 7]
    assert seen[7].tolist() == [1, 2, 4, 6, 7]
    check_same_answers(full, cut, sites)


@settings(max_examples=12, deadline=None)
@given(hst.lists(hst.lists(hst.booleans(), min_size=8, max_size=8), min_size=3, max_size=3))
def test_random_drops_across_sites_match_the_full_batch(r20_ee, r20_batch, leave):
    """Any rows dropped at any sites (never all): the rest answer as in the full batch."""
    sites = (0, 3, 6)
    plan = {s: {i for i in range(8) if out[i]} for s, out in zip(sites, leave)}
    gone = set().union(*plan.values())
    if len(gone) == 8:
        plan[sites[-1]] -= {max(plan[sites[-1]])} if plan[sites[-1]] else set()
        gone = set().union(*plan.values())
    if len(gone) == 8:
        return  # every row leaves: the stop test's case
    full = r20_ee(r20_batch, active=sites)
    on_ramp, _ = dropping(plan)
    cut = r20_ee(r20_batch, on_ramp=on_ramp, active=sites)
    assert (cut.rows.tolist() if cut.rows is not None else list(range(8))) == sorted(set(range(8)) - gone)
    check_same_answers(full, cut, sites)


def test_a_batch_whose_rows_all_left_stops(r20_ee, r20, r20_batch):
    """Rows leave at two sites until none is left: nothing after that site runs."""
    modules = dict(r20.model.named_modules())
    calls = []
    last = modules["layer3.2"].register_forward_hook(lambda *a: calls.append("layer3.2"))
    head = modules["linear"].register_forward_hook(lambda *a: calls.append("linear"))
    try:
        on_ramp, seen = dropping({1: {0, 1, 2, 3}, 4: set(range(8))})
        out = r20_ee(r20_batch, on_ramp=on_ramp, active=(1, 4, 7))
    finally:
        last.remove()
        head.remove()
    assert calls == []  # the forward stopped at site 4
    assert out.stopped and out.final is None and out.final_pred.numel() == 0 and out.rows.size == 0
    assert list(out.ramps) == [1, 4] and 7 not in seen
    assert out.ramps[4].rows.tolist() == [4, 5, 6, 7]
    # the model is whole again: a full call after a stopped one gives the bare model's output
    with torch.inference_mode():
        bare = r20.model(r20_batch)
    assert torch.equal(r20_ee(r20_batch, active=(1, 4, 7)).final, bare)
    assert not any(m._forward_pre_hooks for m in r20_ee.site_modules)


def test_text_encoder_with_padding_keeps_its_answers(minilm_base):
    """MiniLM on texts of different lengths (padding, an attention mask every layer receives):
    dropping rows cuts the mask too, and the remaining texts answer as in the full batch, with
    mean ramps (token weights cut with the rows) and [CLS] ramps."""
    from apparate.model.ramps import RampSpec, build_ramps
    from apparate.model.sites import find_sites

    model, enc = minilm_base
    texts = [SENTENCES[i] for i in (0, 10, 2, 11, 3, 21)]  # 10, 11, 21: one word; the rest long
    x = enc(texts)
    assert not bool(x["attention_mask"].all())  # there is padding
    sites = find_sites(model, x)
    torch.manual_seed(0)
    ramps = build_ramps([RampSpec("mean" if s.index % 2 else "cls", s.shape, 2) for s in sites])
    ee = EarlyExitModel(model, sites, list(ramps))
    try:
        act = tuple(range(len(sites)))
        full = ee(x, active=act)
        on_ramp, _ = dropping({0: {0, 3}, 2: {4}})  # a long text, then a short one, then a long one
        cut = ee(x, on_ramp=on_ramp, active=act)
        assert cut.rows.tolist() == [1, 2, 5]
        check_same_answers(full, cut, act, atol=1e-4)
        assert drop_rows_work(ee, x) is None
    finally:
        ee.remove_hooks()


class MaskedMeanAfterSites(nn.Module):
    """A text model that uses its attention mask in its own forward, after the sites: cutting
    rows between sites cannot work for it (the check says so instead of serving wrong answers)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.l1 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.l1(self.emb(input_ids))
        m = attention_mask.unsqueeze(-1).float()
        return self.head((h * m).sum(1) / m.sum(1))


def test_the_check_refuses_a_model_that_uses_full_batch_tensors_after_a_site(r20_ee, r20_batch):
    from apparate.model.ramps import RampSpec, build_ramps
    from apparate.model.sites import find_sites

    assert drop_rows_work(r20_ee, r20_batch) is None
    torch.manual_seed(0)
    model = MaskedMeanAfterSites().eval()
    x = {"input_ids": torch.tensor([[1, 2, 3], [4, 5, 0], [6, 0, 0]]),
         "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])}
    sites = find_sites(model, x, names=["l1"])
    ee = EarlyExitModel(model, sites, list(build_ramps([RampSpec("cls", sites[0].shape, 2)])))
    try:
        why = drop_rows_work(ee, x)
    finally:
        ee.remove_hooks()
    assert why is not None and "fails" in why


def test_a_wrong_sized_keep_mask_is_a_clear_error(r20_ee, r20_batch):
    with pytest.raises(ValueError, match="keep mask of 3 rows for 8"):
        r20_ee(r20_batch, on_ramp=lambda r: np.ones(3, dtype=bool), active=(2,))
