"""`apparate bench ramps BUNDLE`: what each ramp costs inside the model, against its own compute.

Per round, interleaved and in a rotating order: the bare model on a real batch; the
EarlyExitModel with every ramp active as a server runs it (a clock hook before each ramp's, a
release callback that stores the answers and tests them against a threshold); and, per site,
the ramp alone on that site's cached activation, twice: as its module (`ramp(h)` then `score`,
what the ramp is) and as the serving path runs it (`Ramp.fast` then the host scorer). Medians
over the rounds.

    in-model      the site's cost as served: hook start -> callback end, plus an equal share of
                  what the run cost beyond the bare model and those times (the profiler's measure,
                  `model.profiler.served_ramp_ms`)
    module        the ramp module's forward + softmax scoring alone, in a tight loop
    lean          the serving path's ramp function + host scoring alone, in a tight loop
    ratio         in-model / module (target: at most 1.5 at batch 1)
    share         in-model / the bare batch: what one ramp adds to a non-exiting input

The last line also gives the whole run's extra time per ramp ((served - bare) / sites), which
checks the per-site figures without their apportioning.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ramps", help="per-site ramp cost inside the model vs the ramp's own compute",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle directory (e.g. made by `apparate prepare cifar10-vehicle-resnet56`)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--tokens", type=int, default=32, help="text: tokens per input (default 32)")
    p.add_argument("--rounds", type=int, default=60, help="interleaved rounds (default 60)")
    p.add_argument("--inner", type=int, default=20, help="calls per isolated-ramp timing (default 20)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--data-dir", help="data directory for zoo models")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os
    import time

    import numpy as np
    import torch

    from apparate.bench.timing import markdown_table
    from apparate.model.bundle import load_bundle
    from apparate.model.profiler import served_ramp_ms
    from apparate.model.ramps import score
    from apparate.model.sites import call_model, primary_output

    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle, data_dir=args.data_dir)
    wl = bundle.workload
    if wl is None:
        raise ValueError("the ramp benchmark needs a zoo or hf bundle (its workload supplies real inputs)")
    stream = wl.stream(wl.bootstrap_stream, n=max(8, args.batch))
    x = wl.batch_maker(stream)(args.batch, args.tokens if wl.kind == "text" else None)
    ee = bundle.early_exit_model()
    model, S = ee.backbone, ee.num_sites
    modules = dict(model.named_modules())
    mask = x.get("attention_mask") if isinstance(x, dict) else None

    acts: dict[int, torch.Tensor] = {}
    handles = [modules[s.name].register_forward_hook(
        lambda _m, _i, out, i=s.index: acts.__setitem__(i, primary_output(out))) for s in bundle.sites]
    with torch.inference_mode():
        call_model(model, x)
    for h in handles:
        h.remove()

    from apparate.model.ramps import token_weights

    weights = token_weights(mask)
    fast = [r.fast() for r in bundle.ramps]
    scorer = ee._score

    def timed(fn, inner: int = 1) -> float:
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t) / inner * 1e3

    def bare() -> float:
        return timed(lambda: call_model(model, x))

    def served() -> tuple[float, np.ndarray]:
        b = bare()
        return b, served_ramp_ms(ee, x, b)

    def whole() -> float:  # hooks attached beforehand, as served
        ee.set_active(range(S))
        try:
            return timed(lambda: ee(x, on_ramp=lambda r: r.conf))
        finally:
            ee.set_active(())

    def module_ms(i: int) -> float:
        return timed(lambda: score(bundle.ramps[i](acts[i], mask), ee.confidence), args.inner)

    def lean_ms(i: int) -> float:
        return timed(lambda: scorer(fast[i](acts[i], weights)), args.inner)

    bare_t, whole_t, inmodel, mod, lean = [], [], [], [], []
    with torch.inference_mode():
        for _ in range(3):  # warm-up
            served(), whole(), [module_ms(i) + lean_ms(i) for i in range(S)]
        for r in range(args.rounds):
            steps = [lambda: bare_t.append(bare()), lambda: whole_t.append(whole()),
                     lambda: inmodel.append(served()[1]),
                     lambda: mod.append([module_ms(i) for i in range(S)]),
                     lambda: lean.append([lean_ms(i) for i in range(S)])]
            for k in range(len(steps)):
                steps[(r + k) % len(steps)]()
    b = float(np.median(bare_t))
    im = np.median(np.array(inmodel), axis=0) * 1e3
    md = np.median(np.array(mod), axis=0) * 1e3
    ln = np.median(np.array(lean), axis=0) * 1e3
    rows = [(i, s.name, bundle.specs[i].kind, f"{im[i]:.1f}", f"{md[i]:.1f}", f"{ln[i]:.1f}", f"{im[i] / md[i]:.2f}",
             f"{im[i] / (b * 1e3):.2%}") for i, s in enumerate(bundle.sites)]
    what = f"{args.tokens} tokens" if wl.kind == "text" else "images"
    print(f"# Ramp cost inside the model: {wl.name}, batch {args.batch} ({what}), {args.rounds} interleaved rounds, "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} cores\n")
    print(markdown_table(["site", "module", "ramp", "in-model us", "module us", "lean us", "in-model / module",
                          "share of a pass"], rows))
    per_ramp = (float(np.median(whole_t)) - b) / S * 1e3
    print(f"\nbare pass {b:.3f} ms; median per site: in-model {np.median(im):.1f} us, module {np.median(md):.1f} us, "
          f"lean {np.median(ln):.1f} us, in-model / module {np.median(im / md):.2f} (max {np.max(im / md):.2f}), "
          f"in-model / lean {np.median(im / ln):.2f}")
    print(f"whole run with every ramp active: {per_ramp:.1f} us per ramp over the bare pass "
          f"(sum of the per-site figures: {im.sum() / S:.1f} us per ramp)")
    print(f"\ncommand: apparate bench ramps {args.bundle} --batch {args.batch}"
          + (f" --tokens {args.tokens}" if wl.kind == "text" else "") + f" --rounds {args.rounds} --threads {args.threads}")
    return 0
