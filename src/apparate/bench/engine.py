"""`apparate bench engine BUNDLE`: what the serving engine adds to a batch, over a bare model call.

Four ways to run the same batch of real inputs, interleaved round by round (A B C D A B C D ...),
medians reported:

    bare       the untouched model on the already-encoded batch: `model(x)`
    ee         the EarlyExitModel with the apparate configuration's ramps active (no engine)
    engine-v   the engine, vanilla policy: submit the raw inputs, wait until every answer is out
               (queue, batcher, encoding, execution, release, accounting)
    engine-a   the engine, apparate policy: the same plus ramps, early release at them, and the
               batch's feedback handed to the controller thread

The engine timings are the critical path (submit -> last answer). The controller thread's work
for the batch (profile update, `Controller.observe`) runs off that path; it is timed separately
("control ms/batch") and each round waits for it, so it never overlaps the next measurement.

Ratios: engine-v / bare is the engine's own overhead; engine-a / ee is the engine's overhead with
early release and feedback, ramps excluded; engine-a / bare adds the ramps' cost (bounded by the
ramp budget, 2% by default). Target: engine overhead under 5% at batch 8 for ResNet-56.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("engine", help="engine overhead per batch over a bare model call (interleaved medians)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle directory (e.g. made by `apparate prepare cifar10-vehicle-resnet56`)")
    p.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--rounds", type=int, default=100, help="interleaved rounds (default 100)")
    p.add_argument("--warmup", type=int, default=10, help="untimed rounds first")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--data-dir", help="data directory for zoo models")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import copy
    import time

    import numpy as np
    import torch

    from apparate.model.bundle import load_bundle
    from apparate.serve.control import ControlOptions
    from apparate.serve.engine import Engine, EngineOptions
    from apparate.serve.model_io import ServedModel
    from apparate.serve.scheduler import BatchingOptions
    from apparate.serve.server import settings_for

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    b = args.batch
    bundle = load_bundle(args.bundle, data_dir=args.data_dir)
    wl = bundle.workload
    if wl is None:
        raise ValueError("the engine benchmark needs a zoo or hf bundle (its workload supplies real inputs)")
    bare = copy.deepcopy(bundle.model)  # before any hook is attached: the model as its owner runs it
    stream = wl.stream("test" if wl.kind == "image" else "sst2-dev", n=max(64, b))
    items = [stream.item(i).input for i in range(b)]

    def served() -> ServedModel:
        return ServedModel.from_bundle(bundle, input_shape=tuple(np.asarray(stream.inputs[0]).shape)
                                       if wl.kind == "image" else None)

    settings = settings_for(wl.kind, 0.01, 0.02)
    eo = EngineOptions(batching=BatchingOptions("clockwork", b), slo_ms=1e6, threads=args.threads)
    ev = Engine(served(), eo, ControlOptions(policy="vanilla"))
    sa = served()
    ea = Engine(sa, eo, ControlOptions(policy="apparate", settings=settings))
    ev.start()
    ea.start()
    codec = sa.codec
    x = codec.encode(items)
    ee = sa.ee
    costs = [1] * b if wl.kind == "image" else codec.count(items)

    def t_bare() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            bare(**x) if isinstance(x, dict) else bare(x)
        return time.perf_counter() - t

    def t_ee() -> float:
        sites = ea.live.config.sites
        t = time.perf_counter()
        with torch.inference_mode():
            ee(x, active=sites)
        return time.perf_counter() - t

    def t_engine(engine: Engine, control: list[float]) -> float:
        t = time.perf_counter()
        futs = engine.submit(items, costs)
        for f in futs:
            f.result(60)
        dt = time.perf_counter() - t
        c0 = time.perf_counter()
        engine.flush()
        control.append(time.perf_counter() - c0)
        return dt

    ctl_v: list[float] = []
    ctl_a: list[float] = []
    names = ("bare", "ee", "engine-v", "engine-a")
    fns = (t_bare, t_ee, lambda: t_engine(ev, ctl_v), lambda: t_engine(ea, ctl_a))
    times: dict[str, list[float]] = {n: [] for n in names}
    early: list[int] = []
    for r in range(args.warmup + args.rounds):
        # rotate the order each round so no variant always follows the same one
        order = [(r + k) % len(fns) for k in range(len(fns))]
        for k in order:
            dt = fns[k]()
            if r >= args.warmup:
                times[names[k]].append(dt)
        if r >= args.warmup:
            early.append(ea.metrics.live.snapshot()["window"]["exit_rates"].get("final", 1.0) < 1.0)
    ev.stop()
    ea.stop()
    busy = ea.control.stats().get("busy_ms_per_report", float("nan"))
    med = {n: float(np.median(v)) * 1e3 for n, v in times.items()}
    cfg = ea.live.config
    snap = ea.metrics.live.snapshot()
    print(f"# Engine overhead: {wl.name}, batch {b}, {args.rounds} interleaved rounds (after {args.warmup} warm-up), "
          f"torch threads {torch.get_num_threads()}, {__import__('os').cpu_count()} cores\n")
    print("| variant | median ms/batch | vs bare |")
    print("|---|---:|---:|")
    for n in names:
        print(f"| {n} | {med[n]:.2f} | {med[n] / med['bare']:.3f} |")
    print()
    print(f"engine overhead, vanilla (engine-v / bare):                  {med['engine-v'] / med['bare'] - 1:+.1%}")
    print(f"engine overhead with early release + feedback (engine-a / ee): {med['engine-a'] / med['ee'] - 1:+.1%}")
    print(f"ramps' cost (ee / bare):                                      {med['ee'] / med['bare'] - 1:+.1%}  "
          f"(active ramps {list(cfg.sites)})")
    print(f"apparate engine, all included (engine-a / bare):              {med['engine-a'] / med['bare'] - 1:+.1%}")
    print(f"control thread per batch (off the critical path): {busy:.2f} ms; "
          f"answers released early: {1 - snap['window']['exit_rates'].get('final', 1.0):.1%}")
    print(f"\ncommand: apparate bench engine {args.bundle} --batch {b} --rounds {args.rounds}"
          + (f" --threads {args.threads}" if args.threads else ""))
    return 0
