"""`apparate bench ramps BUNDLE`: what each ramp costs inside the model, against its own compute.

Per round, interleaved and in a rotating order: the bare model on a real batch, and right after
it the EarlyExitModel with every ramp active as a server runs it (hooks attached beforehand, a
release callback that tests the answers against a threshold); and, per site, the ramp alone on
that site's cached activation, twice: as its module (`ramp(h)` then `score`, what the ramp is)
and as the serving path runs it (`Ramp.fast` then the host scorer). Medians over the rounds.

    in-model      the site's cost as served, the profiler's measure (`model.profiler.apportion`):
                  what every ramp together added to the pass, split by the sites' in-hook times
    in-hook       the time inside the site's hook (module end to callback end); above in-model
                  where the backbone's caches are cold there (the hook pays misses the next layer
                  would have paid)
    module        the ramp module's forward + softmax scoring alone, in a tight loop
    lean          the serving path's ramp function + host scoring alone, in a tight loop
    in-model / module    target: at most 1.5 at batch 1
    share         in-model / the bare pass: what one ramp adds to a non-exiting input
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
    from apparate.zoo.bundles import load_bundle
    from apparate.model.profiler import apportion, served_ramp_ms
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

    def pair() -> tuple[float, np.ndarray, float]:
        """(bare ms, each site's in-hook ms, served extra ms) with the two passes side by side."""
        b = bare()
        inside, total = served_ramp_ms(ee, x)
        return b, inside, total - b

    def module_ms(i: int) -> float:
        return timed(lambda: score(bundle.ramps[i](acts[i], mask), ee.confidence), args.inner)

    def lean_ms(i: int) -> float:
        return timed(lambda: scorer(fast[i](acts[i], weights)), args.inner)

    bare_t, inside_t, paid_t, mod, lean = [], [], [], [], []
    with torch.inference_mode():
        for _ in range(3):  # warm-up
            pair(), [module_ms(i) + lean_ms(i) for i in range(S)]
        for r in range(args.rounds):
            def served_step() -> None:
                b, inside, paid = pair()
                bare_t.append(b)
                inside_t.append(inside)
                paid_t.append(paid)
            steps = [served_step, lambda: mod.append([module_ms(i) for i in range(S)]),
                     lambda: lean.append([lean_ms(i) for i in range(S)])]
            for k in range(len(steps)):
                steps[(r + k) % len(steps)]()
    b = float(np.median(bare_t))
    hook = np.median(np.array(inside_t), axis=0) * 1e3
    paid = float(np.median(paid_t))
    im = apportion(hook / 1e3, paid) * 1e3
    md = np.median(np.array(mod), axis=0) * 1e3
    ln = np.median(np.array(lean), axis=0) * 1e3
    rows = [(i, s.name, bundle.specs[i].kind, f"{im[i]:.1f}", f"{hook[i]:.1f}", f"{md[i]:.1f}", f"{ln[i]:.1f}",
             f"{im[i] / md[i]:.2f}", f"{im[i] / (b * 1e3):.2%}") for i, s in enumerate(bundle.sites)]
    what = f"{args.tokens} tokens" if wl.kind == "text" else "images"
    print(f"# Ramp cost inside the model: {wl.name}, batch {args.batch} ({what}), {args.rounds} interleaved rounds, "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} cores\n")
    print(markdown_table(["site", "module", "ramp", "in-model us", "in-hook us", "module us", "lean us",
                          "in-model / module", "share of a pass"], rows))
    print(f"\nbare pass {b:.3f} ms; every ramp together adds {paid * 1e3:.0f} us ({paid / b:.1%}), "
          f"{paid * 1e3 / S:.1f} us per ramp; the in-hook times add up to {hook.sum():.0f} us")
    print(f"median per site: in-model {np.median(im):.1f} us, module {np.median(md):.1f} us, lean {np.median(ln):.1f} us; "
          f"in-model / module {np.median(im / md):.2f} (max {np.max(im / md):.2f})")
    print(f"\ncommand: apparate bench ramps {args.bundle} --batch {args.batch}"
          + (f" --tokens {args.tokens}" if wl.kind == "text" else "") + f" --rounds {args.rounds} --threads {args.threads}")
    return 0
