"""Stopwatches for the profiler: the host clock on the CPU, CUDA events on a GPU.

On a CUDA device a forward returns once its kernels are queued, so `perf_counter` around it, or
inside a hook, times launches, not work. There, marks are events recorded on the device's
current stream and read after a synchronisation (`elapsed_time`); on the CPU they are
`perf_counter` readings, as the profiler always took them.
"""

from __future__ import annotations

import time
from typing import Any


class HostTimer:
    """Marks are perf_counter seconds; nothing to wait for."""

    device_type = "cpu"

    def mark(self) -> Any:
        return time.perf_counter()

    def sync(self) -> None:
        return None

    def ms(self, a: Any, b: Any) -> float:
        return (b - a) * 1e3


class CudaTimer:
    """Marks are timing events on the device's current stream; `ms` needs a `sync()` first."""

    device_type = "cuda"

    def __init__(self, device: Any) -> None:
        import torch

        self.device = torch.device(device)
        self._torch = torch

    def mark(self) -> Any:
        e = self._torch.cuda.Event(enable_timing=True)
        e.record(self._torch.cuda.current_stream(self.device))
        return e

    def sync(self) -> None:
        self._torch.cuda.synchronize(self.device)

    def ms(self, a: Any, b: Any) -> float:
        return float(a.elapsed_time(b))


def timer_for(device: Any) -> HostTimer | CudaTimer:
    import torch

    dev = torch.device("cpu" if device is None else device)
    return CudaTimer(dev) if dev.type == "cuda" else HostTimer()


def device_label(device: Any) -> str:
    """How a profile names its device: 'cpu', or 'cuda:N' with the index spelled out (a profile
    from `cuda` and one from `cuda:0` were measured on the same device)."""
    import torch

    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cuda":
        return f"cuda:{dev.index if dev.index is not None else torch.cuda.current_device()}"
    return dev.type
