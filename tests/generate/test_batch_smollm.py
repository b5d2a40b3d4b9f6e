"""Batched decoding on the real SmolLM2-135M-Instruct: three prompts of different lengths, a few
tokens each, decoded together, against each decoded alone (and, with exits, a full forward)."""

from __future__ import annotations

import pytest
import torch

from apparate.generate.lm import missing_extra

why = missing_extra()
if why:
    pytest.skip(why, allow_module_level=True)

from apparate.generate.batch_decode import generate_batch  # noqa: E402
from apparate.generate.decode import Ramps, generate  # noqa: E402
from apparate.generate.prompts import prompts  # noqa: E402

from .conftest import assert_matches_a_full_forward  # noqa: E402


@pytest.fixture(scope="module")
def three(lm, data_dir):
    texts = prompts(data_dir, "eval", 3)
    ids = [lm.chat_ids(t) for t in texts]
    ids[1] = ids[1][:-9] + ids[1][-5:]  # not the same length as any other
    assert len({len(i) for i in ids}) == 3
    return ids


def test_ramps_off_batch_equals_each_prompt_alone(lm, three):
    decs = generate_batch(lm, three, 5, stop=set())
    for ids, d in zip(three, decs):
        alone = generate(lm, ids, 5, stop=set())
        assert [t.token for t in d.tokens] == [t.token for t in alone.tokens]
        for i in range(lm.num_layers):
            torch.testing.assert_close(d.cache.k[i], alone.cache.k[i], atol=1e-4, rtol=1e-3)
            torch.testing.assert_close(d.cache.v[i], alone.cache.v[i], atol=1e-4, rtol=1e-3)


def test_exits_in_a_batch_keep_each_cache_exact_and_recover_deep_answers(lm, three, lens):
    # threshold 1: every token may exit at layer 9; max_deferred 2 forces a deep token every third
    ramps = Ramps((8, 20), (1.0, 1.0), lens.score)
    decs = generate_batch(lm, three, 6, ramps, max_deferred=2, stop=set())
    for ids, d in zip(three, decs):
        assert sum(t.exit == 0 for t in d.tokens[1:]) >= 2
        assert_matches_a_full_forward(lm, ids, d)
        alone = generate(lm, ids, 6, ramps, max_deferred=2, stop=set())
        assert [(t.token, t.exit) for t in d.tokens] == [(t.token, t.exit) for t in alone.tokens]
