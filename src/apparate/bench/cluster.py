"""`apparate bench cluster BUNDLE`: one replica against two on Ray Serve, and one tuner for all.

1. serving: the bundle deployed on a local Ray (`apparate serve --ray`'s code: `cluster.launch.deploy`)
   with 1 replica, then with 2, each loaded through Serve's HTTP proxy on loopback by the same
   open-loop Poisson trace at `--rate` (the workload's stream as binary tensors, `loadgen`'s
   client), `--rounds` rounds alternating 1, 2, 1, 2; a fresh deployment every run. Reported:
   p50/p95 latency, throughput and goodput side by side, and the ratio two / one.
2. tuning: how many cluster inputs it takes a tuner to re-tune the start Config on served
   feedback, for the cluster-wide tuner (every replica's feedback, `TunerCore`) against a
   per-replica tuner that sees half of it (replica A's batches only), both fed the bundle's
   recorded per-ramp outputs in the same shuffled order, batches alternating between two
   replicas; and the share of inputs released early over the first `--inputs` cluster inputs.
   No Ray and no model: the tuners' own code on recorded feedback.

Ray, the replicas, the tuner and the load generator share this machine: on a small machine two
replicas compete with the client and each other for the same cores, and the table says so.
Run timed benchmarks one at a time (`flock /tmp/apparate-bench.lock apparate bench cluster ...`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from typing import Any

import numpy as np


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster", help="one vs two Ray Serve replicas at the same load; one tuner vs per-replica tuners",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="a zoo bundle (its workload supplies the stream)")
    p.add_argument("--rate", type=float, default=40.0, help="offered load, requests/s (default 40)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per run (default 10)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of unmeasured load first (default 3)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of (1 replica, 2 replicas) (default 2)")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per replica; 1 torch thread each")
    p.add_argument("--stream-name", help="stream of the bundle's workload (default: camera-day / sst2-dev)")
    p.add_argument("--inputs", type=int, default=4096, help="tuning part: cluster inputs fed (default 4096)")
    p.add_argument("--batch", type=int, default=8, help="tuning part: inputs per replica batch (default 8)")
    p.add_argument("--skip-serving", action="store_true", help="only the tuning part (no Ray)")
    p.add_argument("--data-dir", help="data directory (default: $APPARATE_DATA, else ../shared/data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write every figure to this JSON file")
    p.set_defaults(func=run)


def _options(args: argparse.Namespace) -> Any:
    from apparate.cluster.options import absolute_paths
    from apparate.serve.server import ServeOptions

    return absolute_paths(ServeOptions(bundle=args.bundle, data_dir=args.data_dir, threads=1, log_level="warning"))


# ---------------------------------------------------------------------------------------------- tuning

def tuning(opts: Any, inputs: int, batch: int, seed: int) -> dict[str, Any]:
    """Cluster inputs until each tuner first changes its Config on served feedback, and the share
    released early over the run, for the cluster tuner and a per-replica one."""
    from apparate.cluster.tuner_core import TunerCore, TunerSpec
    from apparate.core.types import released

    spec = TunerSpec.from_options(replace(opts, state_dir=None))
    rec = spec.model.recording
    order = np.random.default_rng(seed).permutation(np.resize(np.arange(len(rec.conf)), inputs))
    cores = {"cluster": TunerCore(spec), "per-replica": TunerCore(spec)}
    for core in cores.values():
        core.register("a")
        core.register("b")
    first: dict[str, int | None] = {k: None for k in cores}
    early = {k: 0 for k in cores}
    agrees = {k: 0 for k in cores}
    for k, start in enumerate(range(0, inputs, batch)):
        idx = order[start:start + batch]
        replica = "ab"[k % 2]
        for name, core in cores.items():
            cfg = core.current()["config"]
            sites = list(cfg["sites"])
            conf, agree = rec.conf[idx][:, sites], rec.agree[idx][:, sites]
            at, ok = released(conf, agree, np.asarray(cfg["thresholds"]))
            early[name] += int((at < len(sites)).sum())
            agrees[name] += int(ok.sum())
            if name == "per-replica" and replica == "b":
                continue  # replica B's own tuner would see these; this one sees A's half
            fb = {"sites": tuple(sites), "thresholds": tuple(cfg["thresholds"]), "conf": conf, "agree": agree,
                  "length": None, "sent_at": time.time()}
            core.feedback(replica, {"applied": core.seq, "feedback": [fb]})
            if first[name] is None and core.seq > 1:
                first[name] = start + len(idx)
    return {name: {"first_change_at_cluster_inputs": first[name], "released_early": early[name] / inputs,
                   "accuracy_vs_original": agrees[name] / inputs,
                   "config": cores[name].current()["config"], "fed_inputs": inputs if name == "cluster" else inputs // 2}
            for name in cores}


# ---------------------------------------------------------------------------------------------- serving

def serving(opts: Any, args: argparse.Namespace) -> dict[str, Any]:
    import socket
    from functools import partial

    from apparate.cluster.launch import ClusterOptions, deploy, remove, start_ray, stop_ray
    from apparate.cluster.replica import ReplicaSpec
    from apparate.cluster.tuner_core import TunerSpec
    from apparate.client.loadgen import make_trace, measure, stream_payloads, summarize, wait_ready
    from apparate.serve.server import engine_parts

    start_ray(namespace="apparate-bench", log_to_driver=False)
    tuner_spec = partial(TunerSpec.from_options, opts)
    model = TunerSpec.from_options(opts).model.name
    payloads = stream_payloads(model, args.stream_name, 2048, opts.data_dir, args.seed)
    runs: dict[int, list] = {1: [], 2: []}
    try:
        for r in range(args.rounds):
            for n in (1, 2):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = int(s.getsockname()[1])
                c = deploy(tuner_spec, ReplicaSpec(partial(engine_parts, opts), opts.max_body_bytes, opts.limits()),
                           ClusterOptions(replicas=n, replica_cpus=args.replica_cpus), port=port)
                try:
                    wait_ready(c.url, 300)
                    times = make_trace("poisson", args.rate, args.duration, seed=args.seed + r)
                    runs[n].append(measure(f"{n} replica(s)", c.url, c.model, times, payloads, args.warmup, args.rate,
                                           progress=False))
                    print(f"round {r + 1}, {n} replica(s): done")
                finally:
                    remove(c)
    finally:
        stop_ray()
    return {n: summarize(rs) for n, rs in runs.items()}


def run(args: argparse.Namespace) -> int:
    opts = _options(args)
    out: dict[str, Any] = {"command": "apparate bench cluster " + " ".join(os.sys.argv[3:]),
                           "cpus": os.cpu_count(), "torch_threads_per_replica": 1}
    if not args.skip_serving:
        sums = serving(opts, args)
        out["serving"] = sums
        print(f"\noffered load: Poisson {args.rate:g} requests/s, {args.duration:g} s x {args.rounds} runs each, "
              f"{args.replica_cpus:g} CPU(s) and 1 torch thread per replica, {os.cpu_count()} cores in all")
        from apparate.client.loadgen import format_report

        print(format_report([("1 replica", sums[1]), ("2 replicas", sums[2])]))
    t = tuning(opts, args.inputs, args.batch, args.seed)
    out["tuning"] = t
    print(f"\ntuning on the bundle's recorded ramp outputs, {args.inputs} cluster inputs in batches of {args.batch} "
          "alternating between two replicas:")
    for name, v in t.items():
        print(f"  {name:12s} first re-tuned Config after {v['first_change_at_cluster_inputs']} cluster inputs "
              f"(it was fed {v['fed_inputs']}); over the run: {v['released_early']:.1%} released early, "
              f"{v['accuracy_vs_original']:.2%} agree with the original")
    print(f"\ncommand: {out['command']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 0
