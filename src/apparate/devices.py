"""Which device a command runs its model on: the `--device` flag and its one resolver.

`cpu`, `cuda`, `cuda:N` or `auto` (a CUDA device when one is present, else the CPU). The flag
itself is plain argparse and this module imports torch only inside `resolve_device`, so that
registering the flag keeps `apparate --help` instant. Moving inputs to a device lives beside it
(`to_device`): the codecs call it once per batch.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

DEVICE_HELP = ("where the model runs: cpu, cuda, cuda:N, or auto (a CUDA device when present, else the cpu; "
               "default %(default)s)")


def add_device_arg(parser: argparse.ArgumentParser | Any, default: str = "cpu") -> None:
    """The `--device` flag, the same on every command that runs a model."""
    parser.add_argument("--device", default=default, help=DEVICE_HELP)


def resolve_device(spec: str | Any | None) -> Any:
    """`torch.device` for a `--device` value; a clear ValueError for CUDA where there is none.

    ValueError, because the CLI prints those as one line (exit code 2)."""
    import torch

    if spec is None:
        return torch.device("cpu")
    if isinstance(spec, torch.device):
        dev = spec
    else:
        text = str(spec).strip().lower()
        if text == "auto":
            return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        try:
            dev = torch.device(text)
        except RuntimeError:
            raise ValueError(f"--device {spec!r}: expected cpu, cuda, cuda:N or auto") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ValueError(f"--device {spec!r}: only cpu and cuda devices are supported, not {dev.type}")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: CUDA is not available here (torch {torch.__version__}, "
                         f"built for CUDA {torch.version.cuda or 'none'}); use --device cpu or auto")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"--device {spec}: there {'is' if count == 1 else 'are'} only {count} CUDA device(s), "
                         f"cuda:0..cuda:{count - 1}")
    return dev


def device_of(module: Any) -> Any:
    """The device of a module's first parameter or buffer (the CPU for a module with neither)."""
    import torch

    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def to_device(x: Any, device: Any, pin: bool | None = None) -> Any:
    """A model input (a tensor, or a dict of them as text encoders give) on `device`.

    On the CPU, and for tensors already there, this is the identity. Toward a CUDA device the
    host tensor is pinned first (`pin`, default: for a CUDA target) so that the copy is
    asynchronous: the engine thread queues the batch's copy and its forward back to back
    instead of waiting for the copy. Torch's caching host allocator keeps the pinned buffer
    alive until the copy has run, so it may be dropped here."""
    import torch

    if device is None:
        return x
    dev = torch.device(device)
    if isinstance(x, Mapping):  # text encoders' input_ids and attention_mask (a BatchEncoding too)
        return {k: to_device(v, dev, pin) for k, v in x.items()}
    if not torch.is_tensor(x) or x.device == dev:
        return x
    if dev.type == "cuda" and x.device.type == "cpu":
        if pin if pin is not None else True:
            x = x.pin_memory()
        return x.to(dev, non_blocking=True)
    return x.to(dev)
