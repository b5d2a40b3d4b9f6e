"""The CIFAR-10 ResNet workloads (10 classes, or vehicle or not) and their streams."""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch

from apparate import paths
from apparate.zoo import streams as st
from apparate.zoo.cifar10 import CLASSES, VEHICLE_MAP
from apparate.zoo.workload import Stream, Workload

PathLike = str | os.PathLike | None


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
        frame_size=(32, 32),  # your own images and footage are decoded at this size, without loading a split
        description=(f"CIFAR-10 ResNet-{depth}" + (": is it a vehicle? (its 10-class answer mapped)" if vehicle else "")),
    )

