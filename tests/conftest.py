"""Shared, session-scoped fixtures: real components, small inputs, expensive work done once.

Data comes from APPARATE_DATA or ../shared/data (relative to the repo root), as in CI; nothing
is skipped when it is missing: the tests fail and say where they looked.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings as hypothesis_settings

# The suite is deterministic by default (CI must not fail on a new random example);
# HYPOTHESIS_PROFILE=explore searches with fresh random examples, ten times as many.
hypothesis_settings.register_profile("deterministic", derandomize=True, print_blob=True)
hypothesis_settings.register_profile("explore", max_examples=1000, print_blob=True)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

REPO = Path(__file__).resolve().parents[1]


def find_data_dir() -> Path:
    env = os.environ.get("APPARATE_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    assert path.is_dir(), f"test data not found at {path}: set APPARATE_DATA or provide ../shared/data"
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return find_data_dir()


@pytest.fixture(scope="session")
def r20(data_dir):
    from apparate.zoo.workloads import get_workload

    return get_workload("cifar10-resnet20", data_dir)


@pytest.fixture(scope="session")
def test_images(r20):
    """300 CIFAR test images in the fixed stream order."""
    return r20.stream("test", n=300)


@pytest.fixture(scope="session")
def r20_bundle(r20, tmp_path_factory):
    """ResNet-20 prepared on 400 test images (25% held out), profiled up to batch 4."""
    from apparate.model.prepare import PrepareOptions, prepare_model

    stream = r20.stream("test", n=400)
    out = tmp_path_factory.mktemp("bundles") / "r20"
    opts = PrepareOptions(holdout=0.25, max_batch=4, warmup=1, repeats=3, progress=False, seed=0)
    bundle = prepare_model(r20.model, r20.encode, stream, out, num_classes=10, source=r20.source,
                           class_names=r20.class_names, ramp="pool", options=opts, log=lambda s: None)
    return bundle


@pytest.fixture(scope="session")
def minilm_base():
    """The un-fine-tuned MiniLM-L6 encoder with a fresh (seeded) 2-class head: no training in tests."""
    from apparate.zoo import minilm
    from apparate.zoo.text_workloads import TextEncoder, TextClassifier

    torch.manual_seed(0)
    hf = minilm.load_hf_classifier(minilm.base_model_dir(), num_labels=2)
    enc = TextEncoder(minilm.load_tokenizer(minilm.base_model_dir()))
    return TextClassifier(hf).eval(), enc


SENTENCES = [
    "a gorgeous , witty , seductive movie .", "one long string of cliches .",
    "the acting is superb and the story moving", "it 's a bad sign when you 're rooting for the villain",
    "an utterly charming film", "dull , lifeless and far too long", "a masterpiece of quiet beauty",
    "the plot makes no sense at all", "funny , touching and smart", "i wanted my two hours back",
    "a triumph", "tedious", "the best film of the year , no contest", "flat characters and a predictable ending",
    "warm and generous", "a mess from start to finish", "beautifully shot and well acted",
    "never rises above its silly premise", "an instant classic", "painfully unfunny",
    "sharp writing , great cast", "boring", "delightful from the first frame", "a waste of talent",
]
