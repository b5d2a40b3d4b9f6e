"""`apparate bench engine BUNDLE`: what the serving engine adds to a batch, over a bare model call.

Five ways to run the same batch of real inputs, each round running every variant for `--batches`
batches back to back (the worker's steady state under load), variants interleaved round by round
(A B C D E, B C D E A, ...), medians of the per-batch times reported:

    bare       the untouched model on the already-encoded batch: `model(x)`
    ee         the EarlyExitModel with the initial configuration's ramps active (no engine)
    engine-v   the engine, vanilla policy: submit the raw inputs, wait until every answer is out
               (queue, batcher, encoding, execution, release, accounting)
    engine-s   the engine, static policy (the initial configuration, never changed): the same
               plus ramps and early release at them
    engine-a   the engine, apparate policy: the same plus the batch's feedback handed to the
               controller thread, which tunes and moves ramps (so its ramps differ over time)

Wall time of the engine variants: submit -> the last batch is entirely done (every answer out,
accounting done, the report handed to the controller), divided by the number of batches. CPU
time: all this process spent on them, the controller thread's work included (each round waits
for it, so it never overlaps the next measurement). CPU time is what other processes on a shared
machine do not inflate.

Ratios, of the medians and (`paired`) the median of each round's own ratio (the two variants ran
next to each other, so a machine that slows for a minute moves both): engine-v / bare is the
engine's own overhead; engine-s / ee the engine's overhead with
early release, ramps excluded (same ramps on both sides); engine-a / engine-s what the control
loop adds (its work on the GIL, and the ramps it tries); engine-a / bare everything. Target
(issue 19): engine-v / bare at most 3% at batch 8 for ResNet-56, one thread. The paired ratios'
interquartile range is printed beside them: on a shared machine one run's median moves by a
point or two, so compare runs interleaved (`bench/ab_revisions.sh`).
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("engine", help="engine overhead per batch over a bare model call (interleaved medians)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle directory (e.g. made by `apparate prepare cifar10-vehicle-resnet56`)")
    p.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--rounds", type=int, default=30, help="interleaved rounds (default 30)")
    p.add_argument("--batches", type=int, default=10, help="batches back to back per round and variant (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores but one, as `apparate serve`)")
    p.add_argument("--data-dir", help="data directory for zoo models")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import copy
    import time

    import numpy as np
    import torch

    from apparate.zoo.bundles import load_bundle
    from apparate.serve.control import ControlOptions
    from apparate.serve.engine import Engine, EngineOptions
    from apparate.serve.model_io import ServedModel
    from apparate.serve.scheduler import BatchingOptions
    from apparate.core.settings import Settings
    from apparate.serve.server import default_threads, freeze_heap

    args.threads = args.threads or default_threads()
    torch.set_num_threads(args.threads)
    b = args.batch
    bundle = load_bundle(args.bundle, data_dir=args.data_dir)
    wl = bundle.workload
    if wl is None:
        raise ValueError("the engine benchmark needs a zoo or hf bundle (its workload supplies real inputs)")
    bare = copy.deepcopy(bundle.model)  # before any hook is attached: the model as its owner runs it
    stream = wl.stream("test" if wl.kind == "image" else "sst2-dev", n=max(64, b))
    items = [stream.item(i).input for i in range(b)]

    original = bundle.model

    def served() -> ServedModel:
        bundle.model = copy.deepcopy(original)  # each engine its own backbone, hooks and all, as when serving
        return ServedModel.from_bundle(bundle, input_shape=tuple(np.asarray(stream.inputs[0]).shape)
                                       if wl.kind == "image" else None)

    settings = Settings.for_kind(wl.kind)  # as `apparate serve` with its default flags
    eo = EngineOptions(batching=BatchingOptions("clockwork", b), slo_ms=1e6, threads=args.threads)
    ev = Engine(served(), eo, ControlOptions(policy="vanilla"))
    ss = served()
    es = Engine(ss, eo, ControlOptions(policy="static", settings=settings))
    ea = Engine(served(), eo, ControlOptions(policy="apparate", settings=settings))
    engines = (ev, es, ea)
    for e in engines:
        e.start()
    freeze_heap()  # as `apparate serve` does once warm: collections skip the model and libraries
    codec = ss.codec
    x = codec.encode(items)
    ee = ss.ee
    static_sites = es.live.config.sites
    costs = [1] * b if wl.kind == "image" else codec.count(items)

    K = args.batches

    def call(fn) -> tuple[float, float]:
        w, c = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            for _ in range(K):
                fn()
        return (time.perf_counter() - w) / K, (time.process_time() - c) / K

    def t_bare() -> tuple[float, float]:
        return call(lambda: bare(**x) if isinstance(x, dict) else bare(x))

    def t_ee() -> tuple[float, float]:
        return call(lambda: ee(x, active=static_sites))

    def t_engine(engine: Engine) -> tuple[float, float]:
        # K batches' worth of inputs at once: the worker runs K batches back to back, as under
        # load. Wall: submit -> the last batch entirely done (answers out, accounting done, report
        # handed to the controller). CPU: everything the process spent, the controller thread's
        # work for these batches included (waited for after the wall clock stopped).
        w, c = time.perf_counter(), time.process_time()
        target = engine.admission.admitted + K * b
        futs = engine.submit(items * K, costs * K)
        engine.wait_settled(target, 120)
        wall = time.perf_counter() - w
        for f in futs:
            f.result(60)
        engine.control.flush()
        return wall / K, (time.process_time() - c) / K

    names = ("bare", "ee", "engine-v", "engine-s", "engine-a")
    fns = (t_bare, t_ee, lambda: t_engine(ev), lambda: t_engine(es), lambda: t_engine(ea))
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.warmup + args.rounds):
        # rotate the order each round so no variant always follows the same one
        for k in [(r + j) % len(fns) for j in range(len(fns))]:
            w, c = fns[k]()
            if r >= args.warmup:
                wall[names[k]].append(w)
                cpu[names[k]].append(c)
    for e in engines:
        e.stop()
    busy = ea.control.stats().get("busy_ms_per_report", float("nan"))
    mw = {n: float(np.median(v)) * 1e3 for n, v in wall.items()}
    mc = {n: float(np.median(v)) * 1e3 for n, v in cpu.items()}
    cfg = ea.live.config
    snap = ea.metrics.snapshot()
    print(f"# Engine overhead: {wl.name}, batch {b}, {args.rounds} interleaved rounds of {K} batches back to back "
          f"(after {args.warmup} warm-up), "
          f"torch threads {torch.get_num_threads()}, {__import__('os').cpu_count()} cores\n")
    print("| variant | wall ms/batch (median) | vs bare | CPU ms/batch (median) | vs bare |")
    print("|---|---:|---:|---:|---:|")
    for n in names:
        print(f"| {n} | {mw[n]:.2f} | {mw[n] / mw['bare']:.3f} | {mc[n]:.2f} | {mc[n] / mc['bare']:.3f} |")
    print()
    print("(wall: elapsed; CPU: this process's CPU time, which other processes on the machine do not inflate)")
    for label, num, den in (("engine overhead, vanilla (engine-v / bare)", "engine-v", "bare"),
                            ("engine overhead with early release (engine-s / ee)", "engine-s", "ee"),
                            ("ramps and early-exit model (ee / bare)", "ee", "bare"),
                            ("control loop (engine-a / engine-s)", "engine-a", "engine-s"),
                            ("apparate engine, all included (engine-a / bare)", "engine-a", "bare")):
        # paired: the two variants' times in the same round (next to each other in time), so a
        # machine that slows down for a minute moves both; the median of those ratios
        rw = np.asarray(wall[num]) / np.asarray(wall[den]) - 1
        rc = np.asarray(cpu[num]) / np.asarray(cpu[den]) - 1
        qw, qc = np.percentile(rw, [25, 50, 75]), np.percentile(rc, [25, 50, 75])
        print(f"{label:64s} wall {mw[num] / mw[den] - 1:+6.1%}   CPU {mc[num] / mc[den] - 1:+6.1%}   "
              f"paired: wall {qw[1]:+6.1%} ({qw[0]:+.1%}..{qw[2]:+.1%})  CPU {qc[1]:+6.1%} ({qc[0]:+.1%}..{qc[2]:+.1%})")
    snap_s = es.metrics.snapshot()
    print(f"static: ramps {list(static_sites)}, answers released early "
          f"{1 - snap_s['window']['exit_rates'].get('final', 1.0):.1%}; apparate: config version {cfg.version}, "
          f"now ramps {list(cfg.sites)}, answers released early {1 - snap['window']['exit_rates'].get('final', 1.0):.1%}; "
          f"controller work per batch {busy:.2f} ms (off the critical path, in the CPU column)")
    print(f"\ncommand: apparate bench engine {args.bundle} --batch {b} --rounds {args.rounds} --batches {K} "
          f"--threads {args.threads}")
    return 0
