"""`apparate bench generate --batch B`: batch 1 against B sequences per decode step, vanilla and
early exit, side by side in one run.

The timed prompts are cut into groups of B. Each group is decoded four ways, in an order that
alternates from group to group (A B C D, then D C B A): vanilla at batch 1 (the B prompts one
after another), vanilla at batch B (`generate_batch`: all B share every step), early exit at
batch 1 (`TokenTuner.generate`) and early exit at batch B (`TokenTuner.generate_batch`), the
controller still learning from every sequence. Per group and way: tokens per second over the
whole group (every generated token / the group's wall time), time per token as one client sees
it (its sequence's wall time, prefill to last token, over its tokens; median over the group)
and CPU time per token (this process's); the table shows medians over groups.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable, Sequence

import numpy as np


def run_batched(args: argparse.Namespace, lm: Any, tuner: Any, texts: Sequence[str],
                draw: Callable[[int], Any]) -> int:
    import sys

    import torch

    from apparate.bench.timing import markdown_table
    from apparate.generate.batch_decode import generate_batch
    from apparate.generate.decode import generate

    B, T = args.batch, args.max_new_tokens
    groups = [list(range(g, g + B)) for g in range(0, len(texts) - B + 1, B)]
    ids = [lm.chat_ids(t) for t in texts]
    seed0 = args.warm  # prompt k of the timed ones draws with seed warm + k, as without --batch
    names = ("vanilla, batch 1", f"vanilla, batch {B}", "early exit, batch 1", f"early exit, batch {B}")
    tps: dict[str, list[float]] = {n: [] for n in names}
    lat: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    out: dict[str, list] = {n: [] for n in names}

    def run(name: str, group: list[int]) -> list:
        p = [ids[k] for k in group]
        s = [draw(seed0 + k) for k in group]
        if name == names[0]:
            return [generate(lm, x, T, sampling=d) for x, d in zip(p, s)]
        if name == names[1]:
            return generate_batch(lm, p, T, sampling=s)
        if name == names[2]:
            return [tuner.generate(x, T, sampling=d) for x, d in zip(p, s)]
        return tuner.generate_batch(p, T, sampling=s)

    for gi, group in enumerate(groups):
        for name in (names if gi % 2 == 0 else names[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            decs = run(name, group)
            wall, cpu_s = time.perf_counter() - t0, time.process_time() - c0
            n = sum(len(d.tokens) for d in decs)
            tps[name].append(n / wall)
            lat[name].append(float(np.median([d.wall_s / len(d.tokens) for d in decs])))
            cpu[name].append(cpu_s / n)
            out[name].append(decs)

    base = float(np.median(tps[names[0]]))
    rows = []
    for n in names:
        m = float(np.median(tps[n]))
        rows.append([n, f"{m:.1f}", f"{m / base:.2f}", f"{np.median(lat[n]) * 1e3:.1f}",
                     f"{np.median(cpu[n]) * 1e3:.1f}"])
    print(markdown_table(["decoding", "tokens / s (all sequences)", "x vanilla batch 1",
                          "ms / token (one client)", "CPU ms / token"], rows))
    print(f"(torch threads {torch.get_num_threads()}; {len(groups)} groups of {B} prompts, {T} tokens at most each; "
          "medians over groups; ways interleaved per group)")
    for n in names[2:]:
        toks = [t for decs in out[n] for d in decs for t in d.tokens[1:]]
        agree = sum(t.token == t.deep for t in toks)
        ramp = sum(t.exit < len(t.conf) for t in toks)
        print(f"{n}: agreement with the deep model {agree / max(len(toks), 1):.2%} of {len(toks)} tokens, "
              f"released at a ramp {ramp / max(len(toks), 1):.1%}")
    for v, e in ((names[0], names[1]), (names[2], names[3])):
        same = sum([t.token for t in a.tokens] == [t.token for t in b.tokens]
                   for ga, gb in zip(out[v], out[e]) for a, b in zip(ga, gb))
        print(f"continuations identical, {v} vs {e}: {same} of {len(groups) * B}")
    print("end:", tuner.mode())
    print("reproduce: flock /tmp/apparate-bench.lock apparate bench " + " ".join(sys.argv[2:]))
    return 0
