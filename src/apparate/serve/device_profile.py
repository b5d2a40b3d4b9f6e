"""A bundle profiled on one device and served on another: its latency profile is re-measured.

Times measured on a laptop's CPU say nothing about a GPU's (nor one GPU's about another's), and
the control loops place ramps, tune and admit requests on those times. The server warns and
profiles the model again where it serves, with its own codec's example inputs, before the
usual start-up calibration of ramp costs (`Executor.calibrate`), so everything downstream
sees times from the serving device. On the device it was measured on, the profile is kept.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from apparate.model.timers import device_label

log = logging.getLogger("apparate.serve")

REPEATS = 3  # fewer than `apparate prepare`'s 7: start-up time; the control loop refines it online


def on_serving_device(served: Any, profile: Any, threads: int | None = None) -> Any:
    """`profile` if it was measured on the device `served` runs on, else a new one measured here
    (same batch sizes and lengths), with a warning that says so."""
    from apparate.model.profiler import profile_latency

    here = device_label(served.device)
    if getattr(profile, "device", "cpu") == here:
        return profile
    log.warning("the bundle's latency profile was measured on %s, and it is served on %s: re-profiling here "
                "(prepare the bundle with --device %s to skip this)", profile.device, here, here)
    ee, codec = served.ee, served.codec
    lengths = [int(x) for x in profile.lengths] if served.kind == "text" else None

    def make_batch(b: int, length: int | None) -> Any:
        return codec.encode(codec.example(b, length) if length else codec.example(b))

    t = time.perf_counter()
    before = ee.active
    ee.set_active(())  # the profiler attaches its own hooks and runs the backbone bare
    try:
        new = profile_latency(ee.backbone, ee.sites, list(ee.ramps), make_batch, [int(b) for b in profile.batch_sizes],
                              lengths, warmup=2, repeats=REPEATS, threads=threads, progress=False, device=served.device)
    finally:
        ee.set_active(before)
    log.info("re-profiled on %s in %.1f s: the bare model %.2f ms at batch 1 (the bundle said %.2f on %s)",
             here, time.perf_counter() - t, new.vanilla(1), profile.vanilla(1), profile.device)
    return new
