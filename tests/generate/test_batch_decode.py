"""Several sequences per decode step: each one's tokens, exits, deep answers and KV cache are what
it gets decoded alone, for any batch, prompt lengths, exit pattern and joining order.

On the tiny random Llama (conftest), so hypothesis can try many batches; the real model is
tested in test_batch_smollm.py. The ramps here decide from the row itself (the model's own head
on that layer: fire when its token is even), so a sequence's exits do not depend on which other
sequences share its steps, and batched decoding must reproduce one-sequence decoding exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from apparate.core.types import Config
from apparate.generate.batch_decode import BatchDecoder, Slot, generate_batch
from apparate.generate.control import feedback
from apparate.generate.decode import Decoder, Ramps, Sampling, generate
from apparate.generate.lm import LM

pytest.importorskip("transformers")


def parity_ramps(lm: LM, layers: tuple[int, ...]) -> Ramps:
    """Ramps that answer with the model's own head on their layer and fire when that token is even."""
    norm, head = lm.model.model.norm, lm.model.lm_head

    def score(j, h):
        tok = head(norm(h)).argmax(-1)
        return torch.where(tok % 2 == 0, 0.9, 0.1), tok

    def sample(j, h, g, temperature):
        tok = (head(norm(h)) / temperature + g).argmax(-1)
        return torch.where(tok % 2 == 0, 0.9, 0.1), tok
    return Ramps(layers, (0.5,) * len(layers), score, sample)


def assert_same_decoding(batched: Decoder, alone: Decoder) -> None:
    assert [t.token for t in batched.tokens] == [t.token for t in alone.tokens]
    assert [t.exit for t in batched.tokens] == [t.exit for t in alone.tokens]
    assert [t.deep for t in batched.tokens] == [t.deep for t in alone.tokens]
    for a, b in zip(batched.tokens, alone.tokens):
        np.testing.assert_allclose(a.conf, b.conf, atol=1e-6)  # nan where no ramp saw the row (token 0)
        assert a.ramp_token.tolist() == b.ramp_token.tolist()
    assert not batched.pending and not alone.pending
    for i in range(len(alone.cache.k)):
        torch.testing.assert_close(batched.cache.k[i], alone.cache.k[i], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(batched.cache.v[i], alone.cache.v[i], atol=1e-5, rtol=1e-4)


@settings(max_examples=15, deadline=None)
@given(data=st.data(), n=st.integers(1, 5), layers=st.sets(st.integers(0, 3), max_size=3),
       max_deferred=st.integers(1, 3))
def test_batched_decoding_equals_each_sequence_decoded_alone(tiny, data, n, layers, max_deferred):
    prompts = [data.draw(st.lists(st.integers(3, 96), min_size=1, max_size=9)) for _ in range(n)]
    limits = [data.draw(st.integers(1, 8)) for _ in range(n)]
    max_batch = data.draw(st.integers(1, n))  # below n, later prompts join as earlier ones leave
    ramps = parity_ramps(tiny, tuple(sorted(layers))) if layers else None
    batched = generate_batch(tiny, prompts, limits, ramps, max_deferred, stop=set(), max_batch=max_batch)
    cfg = Config(tuple(range(len(layers))), (0.5,) * len(layers))
    for p, lim, b in zip(prompts, limits, batched):
        alone = generate(tiny, p, lim, ramps, max_deferred, stop=set())
        assert len(b.tokens) == lim
        assert_same_decoding(b, alone)
        # the controller's feedback (agreement of each ramp with the deep token) is the same
        fb, fa = feedback(b, cfg), feedback(alone, cfg)
        assert (fb is None) == (fa is None)
        if fa is not None:
            assert fb.agree.tolist() == fa.agree.tolist()
            np.testing.assert_allclose(fb.conf, fa.conf, atol=1e-6)


def test_ramps_off_batch_is_the_models_greedy_decoding_with_an_exact_cache(tiny):
    prompts = [[5, 17, 33, 2], [9], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]]
    decs = generate_batch(tiny, prompts, 7, stop=set())
    for p, d in zip(prompts, decs):
        with torch.inference_mode():
            ref = tiny.model.generate(torch.tensor([p]), max_new_tokens=7, min_new_tokens=7, do_sample=False,
                                      pad_token_id=0, eos_token_id=None)
            out = tiny.model(torch.tensor([p + [t.token for t in d.tokens[:-1]]]), use_cache=True)
        assert [t.token for t in d.tokens] == ref[0, len(p):].tolist()
        for i, layer in enumerate(out.past_key_values.layers):
            torch.testing.assert_close(d.cache.k[i], layer.keys, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(d.cache.v[i], layer.values, atol=1e-5, rtol=1e-4)


def test_exited_tokens_get_their_deep_answers_in_a_batch(tiny):
    """Every token of every sequence gets the full model's token for its prefix, exited or not."""
    prompts = [[5, 17, 33, 2], [9, 8], [40, 41, 42, 43, 44, 45]]
    decs = generate_batch(tiny, prompts, 10, parity_ramps(tiny, (0, 2)), max_deferred=3, stop=set())
    exited = 0
    for p, d in zip(prompts, decs):
        with torch.inference_mode():
            out = tiny.model(torch.tensor([p + [t.token for t in d.tokens[:-1]]]))
        assert [t.deep for t in d.tokens] == out.logits[0, len(p) - 1:].argmax(-1).tolist()
        exited += sum(t.exit < 2 for t in d.tokens)
        assert all(t.token == (t.ramp_token[t.exit] if t.exit < 2 else t.deep) for t in d.tokens)
    assert exited >= 3  # the test exercised exits, not only final-layer tokens


@settings(max_examples=8, deadline=None)
@given(seeds=st.lists(st.one_of(st.none(), st.integers(0, 99)), min_size=2, max_size=4),
       layers=st.sets(st.integers(0, 3), min_size=1, max_size=2))
def test_greedy_and_sampled_sequences_share_a_batch(tiny, seeds, layers):
    """Each sampled sequence draws with its own noise, whatever else is in its batch."""
    prompts = [[5 + k, 17, 33][: 1 + k % 3] for k in range(len(seeds))]
    draws = [None if s is None else Sampling(1.2, s) for s in seeds]
    ramps = parity_ramps(tiny, tuple(sorted(layers)))
    batched = generate_batch(tiny, prompts, 8, ramps, 2, stop=set(), sampling=draws)
    for p, s, b in zip(prompts, draws, batched):
        assert_same_decoding(b, generate(tiny, p, 8, ramps, 2, stop=set(), sampling=s))
        assert not b._noise


def test_tokens_stream_per_sequence_and_slots_are_reused(tiny):
    got: dict[int, list[int]] = {0: [], 1: [], 2: []}
    decs = generate_batch(tiny, [[5, 6], [7], [8, 9, 10]], [3, 6, 2], parity_ramps(tiny, (1,)), stop=set(),
                          on_emit=lambda k, t: got[k].append(t.token), max_batch=2)
    assert {k: [t.token for t in d.tokens] for k, d in enumerate(decs)} == got


def test_continuous_batching_joins_and_leaves_between_steps(tiny):
    batch = BatchDecoder(tiny, max_batch=2)
    ramps = parity_ramps(tiny, (0, 3))
    a, b, c = (Decoder(tiny, ramps, 2) for _ in range(3))
    batch.join([Slot(a, 6, set()), Slot(b, 2, set())], [[5, 6, 7], [11]])
    with pytest.raises(RuntimeError, match="do not fit"):
        batch.join([Slot(c, 4, set())], [[20, 21]])
    left = []
    while len(left) < 1:
        left += batch.step()
    assert [s.dec for s in left] == [b] and batch.free == 1
    batch.join([Slot(c, 4, set())], [[20, 21]])  # takes b's slot while a is mid-sequence
    while batch.slots:
        left += batch.step()
    assert {id(s.dec) for s in left} == {id(a), id(b), id(c)}
    for d, p, n in ((a, [5, 6, 7], 6), (b, [11], 2), (c, [20, 21], 4)):
        assert_same_decoding(d, generate(tiny, p, n, ramps, 2, stop=set()))
        assert d.wall_s > 0


def test_stop_tokens_and_bad_calls(tiny):
    first = generate(tiny, [5, 6], 1, stop=set()).tokens[0].token
    decs = generate_batch(tiny, [[5, 6], [7, 8]], 5, stop={first})
    assert len(decs[0].tokens) == 1  # stopped at its first token; the other went on
    assert len(decs[1].tokens) == len(generate(tiny, [7, 8], 5, stop={first}).tokens)
    with pytest.raises(ValueError, match="empty prompt"):
        generate_batch(tiny, [[1, 2], []], 3, stop=set())
    with pytest.raises(ValueError, match="max_batch"):
        BatchDecoder(tiny, 0)
    with pytest.raises(ValueError, match="one max_new_tokens"):
        generate_batch(tiny, [[1, 2]], [3, 4], stop=set())
