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
