"""The real SmolLM2-135M-Instruct once per session, and untrained lens ramps over it."""

from __future__ import annotations

import pytest

from apparate.generate.lm import missing_extra


@pytest.fixture(scope="session")
def lm():
    why = missing_extra()
    if why:
        pytest.skip(why)
    from apparate.generate.lm import load_lm
    return load_lm()


@pytest.fixture(scope="session")
def lens(lm):
    """Untrained ramps (the logit lens over a shortlist of the 4,096 first token ids)."""
    import torch

    from apparate.generate.ramps import TokenRamps
    from apparate.generate.train import CANDIDATE_LAYERS
    torch.manual_seed(0)
    return TokenRamps(lm.model.model.embed_tokens.weight, lm.model.model.norm, CANDIDATE_LAYERS,
                      torch.arange(4096), rank=8)


@pytest.fixture(scope="session")
def tiny():
    """A tiny randomly initialised Llama (the same transformers classes as SmolLM2, 5 layers), so
    that hypothesis can try many exit patterns and batches quickly."""
    pytest.importorskip("transformers")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from apparate.generate.lm import LM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    return LM(LlamaForCausalLM(cfg).eval(), tokenizer=None)


def assert_matches_a_full_forward(lm, ids: list[int], dec) -> None:
    """A decoder's KV cache and deep answers equal one full forward over the prompt and the
    tokens it emitted (the last token's own keys are not in the cache yet)."""
    import torch

    seq = ids + [t.token for t in dec.tokens[:-1]]
    with torch.inference_mode():
        out = lm.model(torch.tensor([seq]), use_cache=True)
    for i, layer in enumerate(out.past_key_values.layers):
        torch.testing.assert_close(dec.cache.k[i], layer.keys, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(dec.cache.v[i], layer.values, atol=1e-4, rtol=1e-3)
    assert [t.deep for t in dec.tokens] == out.logits[0, len(ids) - 1:].argmax(-1).tolist()
