"""What a server measures before it takes its first request, so that its promises fit this machine.

The automatic SLO and the 413 check ("can this request ever meet the SLO?") come from the
bundle's LatencyProfile, timed when the bundle was prepared: the model alone, in one process.
Served, a batch also pays the engine (encoding, the ramps' hooks, releases, the HTTP threads'
share of the GIL): on a fresh ResNet-20 server the SLO was logged as fitting requests of 64 inputs
while such requests took 14% longer than it. So at start, after warm-up, the engine serves a few
full batches of example inputs exactly as it serves requests and compares their wall time with
the profile's prediction; the ratio (never below 1) scales the automatic SLO and the idle-server
prediction of the 413 check, and the batches seed the running slowdown the scheduler and
admission use, so that the first requests are judged on measured times too.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .requests import Request


def warm_up_sizes(max_batch: int, text: bool) -> list[int]:
    """Batch sizes to warm up: every size for fixed-size inputs (a request of n inputs runs in
    batches of max_batch and one of n mod max_batch: each shape's first call pays one-off costs),
    a few for text (shapes vary with length anyway)."""
    return list(range(1, max_batch + 1)) if not text else sorted({1, min(8, max_batch), max_batch})


def measure_batches(engine: Any, repeats: int = 3) -> float:
    """Serve `repeats` full batches of example inputs through the engine's executor (answers go
    nowhere, nothing reaches the controller), feed their wall times to the engine's running
    slowdown, and return the median of wall time / predicted time (>= 1)."""
    import torch

    ex, mb = engine.executor, engine.options.batching.max_batch
    codec, live = engine.served.codec, engine.live
    ratios = []
    for _ in range(repeats):
        reqs = [Request(it, 1, 0.0, 0.0) for it in codec.example(mb)]
        t0 = time.perf_counter()
        with torch.inference_mode():
            rep = ex.run(reqs, live.config, t0, live.scorer)
        wall_ms = (time.perf_counter() - t0) * 1e3
        if rep is None:
            continue
        length = rep.length
        predicted = live.costs.batch_ms(mb, 1 if length is None else int(np.ceil(length)))
        ratios.append(wall_ms / max(predicted, 1e-6))
        engine._observe_wall(wall_ms, mb, length)
    ex.reset_stream()  # the examples are no part of the stream
    return max(1.0, float(np.median(ratios))) if ratios else 1.0
