"""The decode loop's deferral keeps every layer's KV cache exact, for any pattern of exits.

A tiny randomly initialised Llama (the same transformers classes as SmolLM2, 4 layers) so that
hypothesis can try many exit patterns quickly; the real model is tested in test_smollm.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from apparate.generate.decode import Decoder, Ramps, generate
from apparate.generate.lm import LM

transformers = pytest.importorskip("transformers")  # the `tiny` fixture (conftest) builds on it


def scripted(lm: LM, fires: list[bool]):
    """A scorer whose ramps fire on a scripted pattern and answer with the model's own head."""
    norm, head = lm.model.model.norm, lm.model.lm_head
    it = iter(fires * 50)

    def score(j, h):
        conf = torch.tensor([0.9 if next(it) else 0.1 for _ in range(h.shape[0])])
        return conf, head(norm(h)).argmax(-1)
    return score


@settings(max_examples=12, deadline=None)
@given(layers=st.sets(st.integers(0, 3), min_size=1, max_size=3),
       fires=st.lists(st.booleans(), min_size=1, max_size=12),
       max_deferred=st.integers(1, 4),
       prompt=st.lists(st.integers(3, 96), min_size=1, max_size=6))
def test_cache_and_deep_answers_match_a_full_forward(tiny, layers, fires, max_deferred, prompt):
    layers = tuple(sorted(layers))
    ramps = Ramps(layers, (0.5,) * len(layers), scripted(tiny, fires))
    dec = generate(tiny, prompt, 10, ramps, max_deferred=max_deferred, stop=set())
    assert len(dec.tokens) == 10 and not dec.pending
    seq = prompt + [t.token for t in dec.tokens[:-1]]
    with torch.inference_mode():
        out = tiny.model(torch.tensor([seq]), use_cache=True)
    for i, layer in enumerate(out.past_key_values.layers):
        assert dec.cache.k[i].shape == layer.keys.shape
        torch.testing.assert_close(dec.cache.k[i], layer.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(dec.cache.v[i], layer.values, atol=1e-5, rtol=1e-4)
    deep = out.logits[0, len(prompt) - 1:].argmax(-1).tolist()
    assert [t.deep for t in dec.tokens] == deep
    for t in dec.tokens:
        if t.exit < len(layers):  # released at a ramp: the emitted token is that ramp's
            assert t.token == t.ramp_token[t.exit]
        else:
            assert t.token == t.deep
    for t in dec.tokens[1:]:  # every row passed every active ramp, deferred or not
        assert not torch.isnan(torch.from_numpy(t.conf)).any()


def test_no_ramps_is_the_models_greedy_decoding(tiny):
    prompt = [5, 17, 33, 2]
    dec = generate(tiny, prompt, 8, stop=set())
    with torch.inference_mode():
        ref = tiny.model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                                  pad_token_id=0, eos_token_id=None)
    assert [t.token for t in dec.tokens] == ref[0, len(prompt):].tolist()
    assert all(t.exit == 0 for t in dec.tokens)


def test_deferred_rows_are_bounded(tiny):
    always = Ramps((0,), (0.5,), scripted(tiny, [True]))
    dec = Decoder(tiny, always, max_deferred=2)
    dec.prefill([4, 5, 6])
    seen = []
    for _ in range(7):
        dec.step()
        seen.append(len(dec.pending))
    assert max(seen) == 2 and 0 in seen  # the third token in a row is kept from exiting
    dec.flush()
    assert not dec.pending


def test_bad_calls_are_refused(tiny):
    with pytest.raises(ValueError, match="empty prompt"):
        generate(tiny, [], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(tiny, [1, 2], 0)
    with pytest.raises(ValueError, match="one threshold per ramp"):
        Decoder(tiny, Ramps((1, 2), (0.5,), None))
    with pytest.raises(RuntimeError, match="prefill first"):
        Decoder(tiny).step()


def scripted_sampler(lm: LM, fires: list[bool]):
    """Sampled-decoding ramps firing on a scripted pattern, sampling with the model's own head and
    the noise they are given."""
    norm, head = lm.model.model.norm, lm.model.lm_head
    it = iter(fires * 50)

    def sample(j, h, g, temperature):
        conf = torch.tensor([0.9 if next(it) else 0.1 for _ in range(h.shape[0])])
        return conf, (head(norm(h)) / temperature + g).argmax(-1)
    return sample


@settings(max_examples=10, deadline=None)
@given(layers=st.sets(st.integers(0, 3), min_size=1, max_size=3),
       fires=st.lists(st.booleans(), min_size=1, max_size=12),
       max_deferred=st.integers(1, 4), seed=st.integers(0, 1000),
       temperature=st.sampled_from([0.5, 1.0, 2.0]))
def test_sampled_decoding_keeps_the_cache_exact_and_draws_the_deep_sample(tiny, layers, fires, max_deferred, seed,
                                                                         temperature):
    """Under sampling too: the cache equals a full forward of the emitted sequence, and each
    token's deep answer is the sample the full model draws for its prefix with the same noise."""
    from apparate.generate.decode import Sampling

    layers = tuple(sorted(layers))
    sampling = Sampling(temperature, seed)
    ramps = Ramps(layers, (0.5,) * len(layers), scripted(tiny, fires), scripted_sampler(tiny, fires))
    prompt = [5, 17, 33, 2]
    dec = generate(tiny, prompt, 10, ramps, max_deferred=max_deferred, stop=set(), sampling=sampling)
    assert len(dec.tokens) == 10 and not dec.pending and not dec._noise
    seq = prompt + [t.token for t in dec.tokens[:-1]]
    with torch.inference_mode():
        out = tiny.model(torch.tensor([seq]), use_cache=True, output_hidden_states=True)
    for i, layer in enumerate(out.past_key_values.layers):
        torch.testing.assert_close(dec.cache.k[i], layer.keys, atol=1e-5, rtol=1e-4)
    logits = out.logits[0, len(prompt) - 1:]
    noise = [sampling.noise(t, logits.shape[-1]) for t in range(10)]
    want = [int((logits[t] / temperature + noise[t]).argmax()) for t in range(10)]
    assert [t.deep for t in dec.tokens] == want
    # every ramp sampled with its token's own noise (the deep head's): its answer is the sample of
    # the model's head on that layer's output for the same prefix
    norm, head = tiny.model.model.norm, tiny.model.lm_head
    with torch.inference_mode():
        for t in range(1, 10):
            for j, layer in enumerate(layers):
                h = out.hidden_states[layer + 1][0, len(prompt) - 1 + t]
                assert dec.tokens[t].ramp_token[j] == int((head(norm(h)) / temperature + noise[t]).argmax()), (t, j)
    assert all(t.token == (t.ramp_token[t.exit] if t.exit < len(layers) else t.deep) for t in dec.tokens)


def test_sampling_is_reproducible_from_its_seed_and_needs_ramps_that_sample(tiny):
    from apparate.generate.decode import Sampling

    prompt = [5, 17, 33, 2]
    runs = [[t.token for t in generate(tiny, prompt, 12, stop=set(), sampling=Sampling(1.5, s)).tokens]
            for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    greedy = [t.token for t in generate(tiny, prompt, 12, stop=set(), sampling=Sampling(0.0, 7)).tokens]
    assert greedy == [t.token for t in generate(tiny, prompt, 12, stop=set()).tokens]  # temperature 0: greedy
    with pytest.raises(ValueError, match="ramps that can sample"):
        generate(tiny, prompt, 4, Ramps((1,), (0.5,), scripted(tiny, [True])), sampling=Sampling(1.0))
    with pytest.raises(ValueError, match="temperature"):
        Sampling(-1.0)
