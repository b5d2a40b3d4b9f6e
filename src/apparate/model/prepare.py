"""Preparation pipeline: sites -> ramps -> frozen-backbone training -> latency profile -> bundle.

`prepare_workload` does it for a workload (a zoo or bring-your-own `Workload`: anything with the
fields it reads); `prepare_model` for any
`torch.nn.Module` with an encoder from raw inputs to model inputs and a bootstrap `Stream`.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from apparate.model.batching import batch_maker as make_batches, encode_batches
from apparate.model.bundle import Bundle, load_bundle, save_bundle
from apparate.model.profiler import num_threads, powers_of_two, profile_latency
from apparate.model.ramps import RampSpec, build_ramps
from apparate.model.sites import find_sites
from apparate.model.training import TrainConfig, agreement_table, collect_activations, train_ramps

Log = Callable[[str], None]


@dataclass(frozen=True)
class PrepareOptions:
    bootstrap: int | None = None  # bootstrap inputs; None = the workload's default
    ramp: str | None = None  # ramp kind; None = the workload's default
    seed: int = 0
    threads: int | None = None  # torch threads for everything (None = torch's default)
    max_batch: int = 64
    epochs: int | None = None
    lr: float | None = None
    holdout: float = 0.1
    confidence: str = "max_softmax"
    sites: Sequence[str] | None = None  # module names, to skip discovery
    warmup: int = 2
    repeats: int = 7
    progress: bool = True
    device: str = "cpu"  # where activations are collected and latency profiled (ramps train on the host)


DEFAULT_BOOTSTRAP = {"image": 5000, "text": 2000}


def prepare_workload(workload: Any, out: str | os.PathLike, options: PrepareOptions = PrepareOptions(),
                     log: Log = print) -> Bundle:
    """Prepare a `Workload` and write its bundle to `out`."""
    n = options.bootstrap or getattr(workload, "bootstrap_size", None) or DEFAULT_BOOTSTRAP.get(workload.kind, 2000)
    stream = workload.stream(workload.bootstrap_stream, seed=options.seed, n=n)
    extra = {"workload": workload.name, "bootstrap_stream": workload.bootstrap_stream,
             "description": workload.description}
    if workload.info:
        extra["model_info"] = workload.info
    return prepare_model(
        workload.model, workload.encode, stream, out, num_classes=workload.num_classes,
        source=workload.source, label_map=workload.label_map, class_names=workload.class_names,
        ramp=options.ramp or workload.default_ramp,
        site_names=options.sites if options.sites is not None else workload.site_names,
        profile_lengths=workload.profile_lengths, options=options, log=log, extra=extra,
        batches=lambda s, b: workload.batches(s, b), batch_maker=workload.batch_maker(stream), workload=workload)


def prepare_model(
    model: nn.Module,
    encode: Callable[[Sequence[Any]], Any],
    bootstrap: Any,
    out: str | os.PathLike,
    *,
    num_classes: int,
    source: dict[str, Any] | None = None,
    label_map: Sequence[int] | None = None,
    class_names: Sequence[str] = (),
    ramp: str = "pool",
    site_names: Sequence[str] | None = None,
    profile_lengths: Sequence[int] | None = None,
    options: PrepareOptions = PrepareOptions(),
    log: Log = print,
    extra: dict[str, Any] | None = None,
    batches: Callable[[Any, int], Any] | None = None,
    batch_maker: Callable[[int, int | None], Any] | None = None,
    workload: Any = None,
) -> Bundle:
    """Prepare any model: find sites, train ramps on `bootstrap` (a Stream), profile, bundle.

    `encode` maps a list of raw inputs (stream items' `.input`) to what `model` takes (a tensor,
    or a dict of keyword tensors). Without a `source`, the bundle records the model's class and
    `load_bundle` will need the model passed in.
    """
    if len(bootstrap) < 10:
        raise ValueError(f"need at least 10 bootstrap inputs, got {len(bootstrap)}")
    torch.manual_seed(options.seed)
    model.eval()
    batches = batches or (lambda s, b: encode_batches(s, encode, b))
    batch_maker = batch_maker or make_batches(bootstrap, encode, bool(profile_lengths))
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    from apparate.devices import resolve_device

    device = resolve_device(options.device)
    with num_threads(options.threads):
        t = time.perf_counter()
        example = encode([bootstrap.item(i).input for i in range(2)])
        sites = find_sites(model, example, site_names)
        timings["sites_s"] = time.perf_counter() - t
        log(f"{len(sites)} candidate sites: {', '.join(s.name for s in sites)}")

        specs = [RampSpec(ramp, s.shape, num_classes) for s in sites]
        ramps = build_ramps(specs)
        t = time.perf_counter()
        model.to(device)
        cache = collect_activations(model, sites, list(ramps), batches(bootstrap, 100), label_map,
                                    progress=options.progress, total=len(bootstrap), device=device)
        model.to("cpu")  # ramps train on the host, on the cached activations
        timings["activations_s"] = time.perf_counter() - t
        cfg = TrainConfig(
            epochs=options.epochs or (10 if ramp == "conv" else 30),
            lr=options.lr or (2e-3 if ramp in ("conv", "deebert") else 3e-3),
            holdout=options.holdout, seed=options.seed)
        t = time.perf_counter()
        result = train_ramps(list(ramps), cache, sites, cfg, options.confidence, progress=options.progress)
        timings["training_s"] = time.perf_counter() - t
        metrics = result.metrics
        metrics["ramp"] = ramp
        acc = metrics.get("original_label_accuracy")
        log(f"per-site agreement with the original model ({ramp} ramps; {metrics['holdout_inputs']} held-out inputs"
            + (f"; original model's label accuracy on the bootstrap {acc:.1%}" if acc is not None else "") + "):")
        log(agreement_table(metrics))

        t = time.perf_counter()
        model.to(device)
        ramps.to(device)
        try:
            profile = profile_latency(model, sites, list(ramps), batch_maker, powers_of_two(options.max_batch),
                                      profile_lengths, options.warmup, options.repeats, progress=options.progress,
                                      device=device)
        finally:  # the bundle is written from the host, and the caller's model comes back as given
            model.to("cpu")
            ramps.to("cpu")
        timings["profile_s"] = time.perf_counter() - t
    over = profile.site_overheads()
    log(f"vanilla latency at batch 1: {profile.vanilla(1):.2f} ms, batch {int(profile.batch_sizes[-1])}: "
        f"{profile.vanilla(int(profile.batch_sizes[-1])):.2f} ms; ramp cost {over.min():.2%}..{over.max():.2%} of a pass")
    timings["total_s"] = time.perf_counter() - t_all
    metrics["timings"] = {k: round(v, 2) for k, v in timings.items()}
    ext = dict(extra or {})
    ext["options"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(options).items()}
    src = source or {"kind": "module"}
    save_bundle(out, source=src, model=model, sites=sites, specs=specs, ramps=list(ramps), profile=profile,
                recording=result.recording, training=metrics, confidence=options.confidence, label_map=label_map,
                class_names=class_names, extra=ext)
    log(f"bundle written to {out} ({timings['total_s']:.0f} s)")
    return load_bundle(out, model=model) if workload is None else _with_workload(load_bundle(out, model=model), workload)


def _with_workload(bundle: Bundle, workload: Any) -> Bundle:
    bundle.workload = workload
    return bundle
