"""`apparate bench gpu BUNDLE --device cuda`: the device check of the GPU path, in a few minutes.

Four tables, all measured on the one device given (`--device`, default auto: CUDA when present):
1. the bare model against the served path (the executor) with no ramps and with N active ramps
   that release nothing (every input pays every ramp: the worst case), at batch 1 and 16;
2. every candidate ramp's cost per site, as `apparate prepare` profiles it (events on CUDA);
3. the host-side release delay after each active ramp: from the ramp's work being done on the
   device (its copy's event) to the waiter thread handing its answers to the release callback;
4. vanilla against apparate live: two in-process engines fed the same paced open-loop stream.

On the CPU it runs as well (that is how it is tested): there the server releases in the hook, and
table 3 shows what the waiter path would add (a thread hand-off), with host-stamp events.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np


def register(sub: argparse._SubParsersAction) -> None:
    from apparate.devices import add_device_arg

    p = sub.add_parser("gpu", help="device check: bare vs early-exit model, ramp costs, release delay, live (docs/gpu.md)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle directory of a zoo or hf workload (e.g. from `apparate prepare cifar10-vehicle-resnet56`)")
    add_device_arg(p, default="auto")
    p.add_argument("--ramps", type=int, default=4, help="active ramps N, spread evenly over the sites (default 4)")
    p.add_argument("--batches", default="1,16", help="batch sizes, comma-separated (default 1,16)")
    p.add_argument("--repeats", type=int, default=30, help="timed runs per measurement (default 30)")
    p.add_argument("--live-s", type=float, default=8.0, help="seconds of live load per policy (default 8; 0 skips it)")
    p.add_argument("--load", type=float, default=0.5, help="live load as a share of the bare model's capacity at the "
                   "largest batch size (default 0.5)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--data-dir", help="data directory for zoo models")
    p.set_defaults(func=run)


@dataclass
class GpuReport:
    device: str
    name: str
    sites: tuple[int, ...]
    passes: list[tuple] = field(default_factory=list)  # (b, bare ms, executor no ramps ms, executor N ramps ms)
    ramp_costs: list[tuple] = field(default_factory=list)  # (site, name, site ms b1, ramp us per size...)
    sizes: tuple[int, ...] = ()
    delays: list[tuple] = field(default_factory=list)  # (b, site, median us, p95 us, callback us)
    live: list[tuple] = field(default_factory=list)  # (policy, n, p50, p95, p99, early share, agreement)


def run(args: argparse.Namespace) -> int:
    import torch

    from apparate.devices import resolve_device
    from apparate.serve.model_io import ServedModel
    from apparate.zoo.bundles import load_bundle

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = tuple(sorted({int(b) for b in args.batches.split(",") if b.strip()}))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"--batches must list positive sizes, got {args.batches!r}")
    bundle = load_bundle(args.bundle, data_dir=args.data_dir, device=device)
    wl = bundle.workload
    if wl is None:
        raise ValueError("the device check needs a zoo or hf bundle (its workload supplies real inputs)")
    stream = wl.stream(wl.bootstrap_stream, n=max(64, max(sizes)))
    items = [stream.item(i).input for i in range(len(stream))]  # [C, H, W] tensors or texts: what codecs take
    served = ServedModel.from_bundle(bundle)
    t = time.perf_counter()
    rep = measure(served, items, ramps=args.ramps, sizes=sizes, repeats=args.repeats, live_s=args.live_s,
                  load=args.load)
    print(format_report(rep))
    print(f"\n({time.perf_counter() - t:.0f} s) command: apparate bench gpu {args.bundle} --device {args.device} "
          f"--ramps {args.ramps} --batches {args.batches} --repeats {args.repeats} --live-s {args.live_s}")
    return 0


def spread(num_sites: int, n: int) -> tuple[int, ...]:
    """n sites spread evenly over 0..num_sites-1 (the first and last quarter included)."""
    n = max(0, min(n, num_sites))
    if n == 0:
        return ()
    return tuple(sorted({int(round(x)) for x in np.linspace(0, num_sites - 1, n + 2)[1:-1]})) if n < num_sites \
        else tuple(range(num_sites))


def measure(served: Any, items: Sequence[Any], ramps: int = 4, sizes: Sequence[int] = (1, 16), repeats: int = 30,
            live_s: float = 8.0, load: float = 0.5) -> GpuReport:
    """Every table of the device check for `served` (a ServedModel on its device), on `items`
    (raw inputs its codec encodes)."""
    from apparate.model.timers import device_label

    import sys

    from apparate.serve.engine import EngineOptions

    sites = spread(served.num_sites, ramps)
    rep = GpuReport(device_label(served.device), served.name, sites, sizes=tuple(sizes))
    # The waiter needs the GIL back from the engine thread after each event: at Python's default
    # 5 ms switch interval that wait dominates the release delay. Served, the engine sets its own
    # (`EngineOptions.switch_interval_ms`); measured here under the same.
    before = sys.getswitchinterval()
    sys.setswitchinterval((EngineOptions().switch_interval_ms or before * 1e3) * 1e-3)
    try:
        rep.passes = _passes(served, items, sites, sizes, repeats)
        rep.ramp_costs = _ramp_costs(served, sizes, max(3, repeats // 6))
        rep.delays = _delays(served, items, sites, sizes, repeats)
    finally:
        sys.setswitchinterval(before)
    if live_s > 0:
        bare_full = next(p[1] for p in rep.passes if p[0] == max(sizes))
        rep.live = _live(served, items, max(sizes), live_s, load * max(sizes) / max(bare_full, 1e-3) * 1e3)
    return rep


def _passes(served: Any, items: Sequence[Any], sites: tuple[int, ...], sizes: Sequence[int],
            repeats: int) -> list[tuple]:
    """Per batch size: the bare forward (device-timed) and a whole executor batch, with no ramps
    and with `sites` active at threshold 0 (wall: a batch ends once every answer is on the host)."""
    import torch

    from apparate.core.controller import Config
    from apparate.model.sites import call_model
    from apparate.model.timers import timer_for
    from apparate.serve.executor import Executor
    from apparate.serve.requests import Request

    ee, codec = served.ee, served.codec
    clock = timer_for(served.device)
    ex = Executor(served, lambda pairs: None)
    out = []
    try:
        for b in sizes:
            batch = [items[i % len(items)] for i in range(b)]
            x = codec.encode(batch)
            bare, none, with_ramps = [], [], []
            for r in range(repeats + 3):  # three warm-up rounds
                with torch.inference_mode():
                    clock.sync()
                    t0 = clock.mark()
                    call_model(ee.backbone, x)
                    t1 = clock.mark()
                    clock.sync()
                    walls = []
                    for cfg in (Config((), ()), Config(sites, (0.0,) * len(sites))):
                        reqs = [Request(it, 1, 0.0, 0.0) for it in batch]
                        w = time.perf_counter()
                        ex.run(reqs, cfg, w)
                        walls.append((time.perf_counter() - w) * 1e3)
                if r >= 3:
                    bare.append(clock.ms(t0, t1))
                    none.append(walls[0])
                    with_ramps.append(walls[1])
            out.append((b, float(np.median(bare)), float(np.median(none)), float(np.median(with_ramps))))
    finally:
        ex.close()
    return out


def _ramp_costs(served: Any, sizes: Sequence[int], repeats: int) -> list[tuple]:
    """Each candidate ramp's cost and its site's depth, profiled on the device (`profile_latency`)."""
    from apparate.model.profiler import profile_latency

    ee, codec = served.ee, served.codec
    length = None if served.kind != "text" else int(served.profile.lengths[len(served.profile.lengths) // 2])

    def make_batch(b: int, length: int | None) -> Any:
        return codec.encode(codec.example(b, length) if length else codec.example(b))

    prof = profile_latency(ee.backbone, ee.sites, list(ee.ramps), make_batch, list(sizes),
                           None if length is None else [length], warmup=2, repeats=repeats, progress=False,
                           device=served.device)
    rows = []
    for s, site in enumerate(ee.sites):
        per = [float(prof.ramp_ms[0, k, s]) * 1e3 for k in range(len(sizes))]
        share = per[-1] / 1e3 / float(prof.vanilla_ms[0, -1])
        rows.append((s, site.name, float(prof.site_ms[0, 0, s]), *per, share))
    return rows


class StampEvent:
    """A host stand-in for a device event: `record()` takes the clock (on the CPU a ramp's work is
    done when its callback runs), `synchronize()` has nothing to wait for."""

    def __init__(self) -> None:
        self.t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True


def _delays(served: Any, items: Sequence[Any], sites: tuple[int, ...], sizes: Sequence[int],
            repeats: int) -> list[tuple]:
    """Per batch size and active ramp: how long after the ramp's copy was done on the device the
    waiter had its answers (median and 95th percentile, us), and what the callback then took."""
    import torch

    from apparate.model.host_copy import CudaEvent, HostRelease
    from apparate.model.timers import timer_for

    ee, codec, dev = served.ee, served.codec, served.device
    cuda = dev.type == "cuda"
    host = HostRelease(dev, event=(lambda: CudaEvent(dev, True)) if cuda else StampEvent, trace=True)
    clock = timer_for(dev)
    rows = []

    def on_ramp(r: Any) -> None:
        r.conf  # scored on the host, as the executor's release test reads it

    try:
        for b in sizes:
            x = codec.encode([items[i % len(items)] for i in range(b)])
            delay: dict[int, list[float]] = {s: [] for s in sites}
            cb_us: dict[int, list[float]] = {s: [] for s in sites}
            for r in range(repeats + 3):
                with torch.inference_mode():
                    clock.sync()
                    t0, start = time.perf_counter(), clock.mark()
                    ee(x, on_ramp=host.bind(on_ramp), active=sites)
                    host.finish()
                if r < 3:
                    continue
                for tr in host.last_traces:
                    # when the event passed on the host clock: device time since `start`, whose own
                    # host time is t0 (the device was idle, so it passed at once)
                    at = t0 + start.elapsed_time(tr.event.event) * 1e-3 if cuda else tr.event.t
                    delay[tr.site].append(max(tr.ready - at, 0.0) * 1e6)
                    cb_us[tr.site].append((tr.done - tr.ready) * 1e6)
            for s in sites:
                d = np.asarray(delay[s])
                rows.append((b, s, float(np.median(d)), float(np.percentile(d, 95)), float(np.median(cb_us[s]))))
    finally:
        host.close()
    return rows


def _live(served: Any, items: Sequence[Any], max_batch: int, seconds: float, rate: float) -> list[tuple]:
    """Vanilla and apparate engines in turn, each fed `rate` inputs/s for `seconds`, the same
    inputs at the same offsets: latency percentiles, early answers, agreement with vanilla."""
    from apparate.core.settings import Settings
    from apparate.serve.control import ControlOptions
    from apparate.serve.engine import Engine, EngineOptions
    from apparate.serve.scheduler import BatchingOptions

    n = max(int(seconds * rate), max_batch)
    offsets = np.arange(n) / rate
    stream = [items[i % len(items)] for i in range(n)]
    costs = served.codec.count(stream) if served.kind == "text" else [1] * n  # text: tokens, as a request's parse
    labels: dict[str, list[int]] = {}
    rows = []
    for policy in ("vanilla", "apparate"):
        eo = EngineOptions(batching=BatchingOptions("clockwork", max_batch), slo_ms=1e4, threads=None)
        engine = Engine(served, eo, ControlOptions(policy=policy, settings=Settings.for_kind(served.kind)))
        engine.start()
        try:
            futs = []
            t0 = time.perf_counter()
            for i, it in enumerate(stream):  # open loop: each input at its time, answered or not
                wait = t0 + offsets[i] - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                futs.extend(engine.submit([it], costs[i:i + 1]))
            answers = [f.result(120) for f in futs]
        finally:
            engine.stop()
            engine.executor.close()
        ok = [a for a in answers if hasattr(a, "latency_ms")]
        lat = np.asarray([a.latency_ms for a in ok])
        labels[policy] = [a.label if hasattr(a, "label") else -1 for a in answers]
        agree = float(np.mean(np.asarray(labels[policy]) == np.asarray(labels["vanilla"])))
        rows.append((policy, len(ok), *(float(np.percentile(lat, q)) for q in (50, 95, 99)),
                     float(np.mean([a.early for a in ok])), agree, rate))
    served.ee.set_active(())
    return rows


def format_report(rep: GpuReport) -> str:
    from apparate.bench.timing import markdown_table

    out = [f"# Device check: {rep.name} on {rep.device}, active ramps at sites {list(rep.sites)}\n",
           "## 1. Bare model vs the served path (ms, medians)\n",
           markdown_table(["batch", "bare forward", "executor, no ramps", f"executor, {len(rep.sites)} ramps",
                           "ramps add"],
                          [(b, f"{bare:.3f}", f"{v:.3f}", f"{e:.3f}", f"{e / v - 1:+.1%}") for b, bare, v, e in rep.passes]),
           "\n## 2. Ramp cost per site (profiled on the device)\n",
           markdown_table(["site", "module", "backbone to site ms (b1)", *(f"ramp us (b{b})" for b in rep.sizes),
                           f"share of a pass (b{rep.sizes[-1]})"],
                          [(s, name, f"{d:.3f}", *(f"{v:.1f}" for v in per[:-1]), f"{per[-1]:.2%}")
                           for s, name, d, *per in rep.ramp_costs]),
           "\n## 3. Host-side release delay after each ramp (us)\n",
           markdown_table(["batch", "site", "delay median", "delay p95", "callback median"],
                          [(b, s, f"{m:.1f}", f"{p:.1f}", f"{c:.1f}") for b, s, m, p, c in rep.delays])]
    if rep.live:
        out += ["\n## 4. Live: vanilla vs apparate, same open-loop stream (latency ms)\n",
                markdown_table(["policy", "answers", "p50", "p95", "p99", "released early", "agrees with vanilla",
                                "load /s"],
                               [(p, n, f"{a:.2f}", f"{b:.2f}", f"{c:.2f}", f"{e:.1%}", f"{g:.1%}", f"{r:.0f}")
                                for p, n, a, b, c, e, g, r in rep.live])]
    return "\n".join(out)
