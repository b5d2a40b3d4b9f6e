"""`apparate bench generate`: per-token early exit on SmolLM2-135M-Instruct, vanilla vs ramps.

Ramps (built and cached on first use, see docs/generate.md) are placed by the controller from
their bootstrap, tuned online on `--warm` held-out prompts (each token is an input; its deep
answer is the feedback), then timed side by side with vanilla decoding on `--prompts` further
prompts, interleaved per prompt (A B, then B A) and greedy, with the controller still learning.
Reported: time per generated token and tokens/s (prefill, steps and the final flush included),
median over prompts; token agreement (each emitted token vs the deep model's token for the same
prefix: the controller's accuracy); continuations identical to vanilla's; share of tokens
released at a ramp, per site. `transformers`' own `generate` is timed beside as a reference.
Run it under the bench lock: `flock /tmp/apparate-bench.lock apparate bench generate`.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="per-token early exit on a small LM: time per token, agreement, exits",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=12, help="timed prompts (default 12)")
    p.add_argument("--warm", type=int, default=24, help="prompts that tune the controller before timing (default 24)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens per prompt (default 48)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampled decoding at this temperature (default 0: greedy); prompt k draws with seed k, "
                        "the same for vanilla and early exit")
    p.add_argument("--max-deferred", type=int, default=8, help="deferred rows allowed at once (default 8)")
    p.add_argument("--batch", type=int, default=1,
                   help="B > 1: time batch 1 against B sequences per decode step instead, vanilla and early exit, "
                        "on groups of B timed prompts (see bench/generate_batch.py; default 1)")
    add_tuner_args(p)
    p.set_defaults(func=run)


def add_tuner_args(p: argparse.ArgumentParser) -> None:
    """The flags `build_tuner` takes, shared by `apparate generate` and `apparate bench generate`."""
    p.add_argument("--accuracy-constraint", type=float, default=0.01, help="token disagreement allowed (default 0.01)")
    p.add_argument("--ramp-budget", type=float, default=0.02, help="ramp cost allowed, share of a step (default 0.02)")
    p.add_argument("--train-prompts", type=int, default=256, help="prompts the ramps are trained on (default 256)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--data-dir", help="data directory (SST-2; default $APPARATE_DATA, else ../shared/data)")


def run(args: argparse.Namespace) -> int:
    import sys

    import numpy as np
    import torch

    from apparate import paths
    from apparate.bench.timing import markdown_table
    from apparate.generate.control import build_tuner
    from apparate.generate.decode import Sampling, generate
    from apparate.generate.prompts import prompts

    if args.prompts < 1 or args.warm < 0 or args.max_new_tokens < 2:
        raise ValueError("need --prompts >= 1, --warm >= 0 and --max-new-tokens >= 2")
    if args.batch < 1 or args.prompts < args.batch:
        raise ValueError("need --batch >= 1 and at least --batch timed --prompts")
    data = paths.data_dir(args.data_dir)
    lm, assets, costs, tuner = build_tuner(data, threads=args.threads, train_prompts=args.train_prompts,
                                           accuracy_constraint=args.accuracy_constraint, ramp_budget=args.ramp_budget,
                                           max_deferred=args.max_deferred)
    print(f"torch threads {torch.get_num_threads()}; CPU ms at 1 row (2 rows): layer (a 30-layer pass / 30) {costs['layer_ms']:.3f} "
          f"({costs['layer_2rows_ms']:.3f}), vocabulary head {costs['head_ms']:.3f} ({costs['head_2rows_ms']:.3f}), "
          f"{costs['head_share']:.1%} of a step; one ramp {costs['ramp_ms']:.3f} ({costs['ramp_share']:.2%} of a step)")
    print(f"bootstrap agreement per candidate layer: "
          + ", ".join(f"{l + 1}: {a:.1%}" for l, a in zip(assets.ramps.layers, assets.boot_agree.mean(0))))
    print("start:", tuner.mode())
    texts = prompts(data, "eval", args.warm + args.prompts)
    T = args.max_new_tokens
    draw = lambda k: Sampling(args.temperature, seed=k)  # noqa: E731
    for k, text in enumerate(texts[:args.warm]):
        tuner.generate(lm.chat_ids(text), T, sampling=draw(k))
    print(f"after {args.warm} warm-up prompts:", tuner.mode())
    if args.batch > 1:
        from apparate.bench.generate_batch import run_batched
        return run_batched(args, lm, tuner, texts[args.warm:], draw)

    def hf(ids):
        with torch.inference_mode():
            out = lm.model.generate(torch.tensor([ids]), max_new_tokens=T, do_sample=args.temperature > 0,
                                    temperature=args.temperature or None,
                                    pad_token_id=lm.model.config.pad_token_id)
        return out.shape[1] - len(ids)

    import time
    per_tok = {"vanilla": [], "early exit": [], "transformers": []}
    cpu_tok = {k: [] for k in per_tok}
    agree_n = exits_n = tokens_n = same = 0
    site_exits = np.zeros(len(assets.ramps.layers))
    for i, text in enumerate(texts[args.warm:]):
        ids = lm.chat_ids(text)
        order = ("vanilla", "early exit", "transformers") if i % 2 == 0 else ("transformers", "early exit", "vanilla")
        for name in order:
            if name == "vanilla":
                van = generate(lm, ids, T, sampling=draw(args.warm + i))
                per_tok[name].append(van.wall_s / len(van.tokens))
                cpu_tok[name].append(van.cpu_s / len(van.tokens))
            elif name == "early exit":
                cfg = tuner.config
                ee = tuner.generate(ids, T, sampling=draw(args.warm + i))
                per_tok[name].append(ee.wall_s / len(ee.tokens))
                cpu_tok[name].append(ee.cpu_s / len(ee.tokens))
            else:
                t0, c0 = time.perf_counter(), time.process_time()
                n = hf(ids)
                per_tok[name].append((time.perf_counter() - t0) / max(n, 1))
                cpu_tok[name].append((time.process_time() - c0) / max(n, 1))
        rows = ee.tokens[1:]
        tokens_n += len(rows)
        agree_n += sum(t.token == t.deep for t in rows)
        for t in rows:
            if t.exit < len(cfg.sites):
                exits_n += 1
                site_exits[cfg.sites[t.exit]] += 1
        same += [t.token for t in ee.tokens] == [t.token for t in van.tokens]
    med = {k: float(np.median(v)) * 1e3 for k, v in per_tok.items()}
    cpu = {k: float(np.median(v)) * 1e3 for k, v in cpu_tok.items()}
    rows = [[k, f"{m:.2f}", f"{1e3 / m:.1f}", f"{med['vanilla'] / m:.3f}", f"{cpu[k]:.2f}", f"{cpu['vanilla'] / cpu[k]:.3f}"]
            for k, m in med.items()]
    print(markdown_table(["decoding", "ms / token", "tokens / s", "speedup", "CPU ms / token", "CPU speedup"], rows))
    print("(medians over prompts; speedups against vanilla, the same loop with no ramps; CPU time is this "
          "process's, which other processes' load does not inflate)")
    print(f"token agreement with the deep model: {agree_n / max(tokens_n, 1):.2%} of {tokens_n} tokens "
          f"(constraint {args.accuracy_constraint:.0%}); released at a ramp: {exits_n / max(tokens_n, 1):.1%}")
    print("exits per layer: " + (", ".join(f"{assets.ramps.layers[s] + 1}: {c / max(tokens_n, 1):.1%}"
                                            for s, c in enumerate(site_exits) if c) or "none"))
    print(f"continuations identical to vanilla: {same} of {args.prompts}")
    from collections import Counter
    kinds = Counter(e.kind for e in tuner.controller.events)
    print("end:", tuner.mode(), "| controller decisions: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
    print("reproduce: flock /tmp/apparate-bench.lock apparate bench " + " ".join(sys.argv[2:] if len(sys.argv) > 2 else []))
    return 0
