"""CIFAR-10 ResNets (He et al. 2016, CIFAR variant), written for the project.

Three stages of 16/32/64 channels with n BasicBlocks each (n = 3, 5, 7, 9 for depths 20, 32,
44, 56), option-A shortcuts (stride-2 subsampling plus zero-padding of the new channels, no
parameters), global average pooling and a final `linear`. Parameter names match the published
checkpoints once their `module.` prefix is stripped.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DEPTHS = (20, 32, 44, 56)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class PadShortcut(nn.Module):
    """Option-A shortcut: take every other pixel and zero-pad the extra channels."""

    def __init__(self, pad_channels: int) -> None:
        super().__init__()
        self.pad_channels = pad_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pad_channels
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p), "constant", 0.0)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(planes // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 56, num_classes: int = 10) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"CIFAR ResNet depth must be one of {DEPTHS}, got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.in_planes = 16
        self.layer1 = self._stage(16, n, 1)
        self.layer2 = self._stage(32, n, 2)
        self.layer3 = self._stage(64, n, 2)
        self.linear = nn.Linear(64, num_classes)

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def weights_file(data_dir: Path, depth: int) -> Path:
    folder = data_dir / "cifar10-resnet"
    found = sorted(folder.glob(f"resnet{depth}-*.th"))
    if not found:
        raise FileNotFoundError(f"no CIFAR ResNet-{depth} weights (resnet{depth}-*.th) in {folder}")
    return found[0]


def load_cifar_resnet(data_dir: str | os.PathLike, depth: int, verify: bool = True) -> CifarResNet:
    """A CIFAR ResNet with the published weights, in eval mode.

    Loaded with `weights_only=True` (no arbitrary pickles). The file name's suffix is the first
    8 hex digits of its sha256, which we check so a corrupt or swapped file fails loudly.
    """
    path = weights_file(Path(data_dir), depth)
    if verify:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
        suffix = path.stem.rsplit("-", 1)[-1]
        if digest != suffix:
            raise ValueError(f"{path} is corrupt: sha256 starts {digest}, file name says {suffix}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = CifarResNet(depth)
    model.load_state_dict(state, strict=True)
    return model.eval()


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] uint8 (or float in 0..255) -> the normalised float input the weights expect."""
    # In place on a fresh float copy, with the constants made once: the same float ops in the same
    # order as (x / 255 - mean) / std, for a third of the time (it runs on every served batch).
    x = images_uint8.float() if images_uint8.dtype != torch.float32 else images_uint8.clone()
    mean, std = _constants(x.dtype)
    return x.div_(255.0).sub_(mean).div_(std)


_CONSTANTS: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}


def _constants(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if dtype not in _CONSTANTS:
        _CONSTANTS[dtype] = (torch.tensor(MEAN, dtype=dtype).view(1, 3, 1, 1),
                             torch.tensor(STD, dtype=dtype).view(1, 3, 1, 1))
    return _CONSTANTS[dtype]
