"""`apparate bench simspeed`: how fast the replay simulator runs each policy (requests per second
on one core), on a synthetic recording or a real one, interleaved across policies."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simspeed", help="replay speed per policy (simulated requests per second)", description=__doc__)
    p.add_argument("--n", type=int, default=60_000, help="requests per replay (default 60,000)")
    p.add_argument("--sites", type=int, default=27, help="candidate sites of the synthetic recording (default 27)")
    p.add_argument("--rate", type=float, default=1000.0,
                   help="Poisson arrival rate, req/s (default 1000: ~80%% of the synthetic model's capacity)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--policies", default="vanilla,static,apparate,branchynet+,optimal")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from apparate.bench.timing import interleaved_medians, markdown_table, thread_note
    from apparate.core.profile import LatencyProfile
    from apparate.core.synthetic import drift_curve, synthetic_recording
    from apparate.policies import PolicyInputs, make_policy
    from apparate.policies.catalog import RampFamily
    from apparate.zoo import traces
    from apparate.core.batchers import ClockworkBatcher
    from apparate.replay.summary import summarize
    from apparate.replay.simulator import replay

    S, n = args.sites, args.n
    # A ResNet-56-like profile: ~10 ms at batch 1, batch time ~affine in batch size.
    prof = LatencyProfile.linear(S, vanilla_ms=10.0, ramp_fraction=0.0015, per_item_fraction=0.05,
                                 batch_sizes=(1, 2, 4, 8, 16, 32, 64))
    fam = RampFamily(synthetic_recording(1000, S, seed=1),
                     synthetic_recording(n, S, seed=2, difficulty=drift_curve(n, [(1, 0), (1, 0.3), (1, -0.2)])), prof)
    arrivals = np.asarray(traces.poisson(args.rate, n=n, seed=3))
    names = [p.strip() for p in args.policies.split(",")]
    inputs = PolicyInputs(fam)
    runs = {}

    # Policies are built outside the timed region (placement and one-time tuning are not replay);
    # each timed run gets a fresh copy, so adaptive ones start from scratch every time.
    import copy

    built = {nm: make_policy(nm, inputs) for nm in names}

    # The copies are made before timing too (a deep copy of the controller is not replay).
    fresh = {nm: [copy.deepcopy(built[nm]) for _ in range(args.repeats)] for nm in names}

    def job(name):
        def go():
            policy = fresh[name].pop()
            runs[name] = replay(fam.evaluation, arrivals, prof, policy, ClockworkBatcher(args.max_batch), slo_ms=200.0)
        return go

    times = interleaved_medians([job(nm) for nm in names], args.repeats, cpu=True)
    rows = []
    for name, t in zip(names, times):
        m = summarize(runs[name])
        rows.append((name, f"{n / t:,.0f}", f"{n / t * 60 / 1e6:.2f}", f"{m.mean_batch:.1f}", f"{m.accuracy:.2%}",
                     f"{t:.2f}"))
    print(f"# Replay speed: {n:,} requests, {S} candidate sites, Poisson {args.rate:g} req/s, Clockwork max batch "
          f"{args.max_batch}; {thread_note()}; CPU time of this process (one core), policy construction excluded, medians of {args.repeats} interleaved runs\n")
    print(markdown_table(["policy", "requests/s (CPU)", "M requests/min", "mean batch", "acc vs original", "CPU s"], rows))
    print(f"\nreproduce: apparate bench simspeed --n {n} --rate {args.rate:g} --max-batch {args.max_batch}")
    return 0
