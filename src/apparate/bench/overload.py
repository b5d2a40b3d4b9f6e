"""`apparate bench overload BUNDLE`: goodput and latency of a real server from half to three times its capacity.

Starts `apparate serve BUNDLE` (a subprocess on a free loopback port, `--threads 1` by default)
and loads it with real HTTP requests from the bundle's workload stream (binary tensors for
images), through `apparate.client.httpload`: a raw HTTP/1.1 client costing tens of microseconds
per request, since at three times a server's capacity aiohttp alone would take most of a
small machine. The client and the server share the machine: what the client costs, the server
does not get, and the table says how much CPU the client and any other process took.

1. capacity: the highest open-loop Poisson rate at which at least 99% of the requests are
   answered within the server's SLO, found by bisection between 0.3 and 1.2 times the
   throughput of a closed loop (2 x max batch requests outstanding), that range doubled first
   while its top still passes (an SLO shorter than a full batch makes the closed loop refuse
   most of its requests), each probe on a drained queue; `--capacity` skips it;
2. load: open-loop Poisson arrivals at each `--multiples` of that capacity, `--duration`
   seconds each, `--runs` rounds, the multiples interleaved within each round (0.5x 1x ... 3x,
   then again), a new arrival seed every run, the server drained between runs;
3. liveness under one heavy request: `/v2/health/live` polled on its own connection while the
   largest request the server admits (max inputs, JSON numbers for images) is decoded and served.

Per multiple: goodput (answers within the SLO per second of offered load), what was served
and its p50/p99 latency (client-measured, from the scheduled send time), 503s by reason, and
the server's batch-time state after the run (the profile's full-batch time, which must not
grow with load, and the measured slowdown). Verdicts: goodput at 3x against 0.9 x capacity,
and the spread of the 1x runs' goodput (max - min over their mean) against 10%.
"""

from __future__ import annotations

import argparse
from typing import Callable


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("overload", help="a real server from 0.5x to 3x its capacity: goodput, latency, shedding",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle directory (a zoo or hf bundle: its workload supplies the inputs)")
    p.add_argument("--stream-name", help="stream of the bundle's workload (default: test for images, sst2-dev for text)")
    p.add_argument("--multiples", default="0.5,1,1.5,2,3", help="loads, as multiples of the measured capacity")
    p.add_argument("--runs", type=int, default=3, help="rounds over every multiple (default 3)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of load per run (default 5)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of unmeasured load first")
    p.add_argument("--capacity", type=float, help="requests/s to take as capacity instead of measuring it")
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads (default 1)")
    p.add_argument("--policy", default="apparate", choices=("apparate", "static", "vanilla"))
    p.add_argument("--serve-arg", action="append", default=[], help="any other `apparate serve` flag (repeatable)")
    p.add_argument("--server-log", help="directory for the server's log (default: a temporary one)")
    p.add_argument("--data-dir", help="data directory (default: $APPARATE_DATA, else ../shared/data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write every figure to this JSON file")
    p.set_defaults(func=run)


# ---------------------------------------------------------------------------------------------- CPU

def _cpu_s(pid: int | str = "self") -> float:
    """User + system CPU seconds of a process so far (Linux /proc), 0 when unknown."""
    import os

    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _machine_cpu_s() -> float:
    """CPU seconds every process on the machine has used so far (all cores), 0 when unknown."""
    import os

    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


class CpuMeter:
    """CPU used by the client (this process), the server, and everything else, over a span."""

    def __init__(self, server_pid: int):
        self.pid = server_pid

    def __enter__(self) -> "CpuMeter":
        import time

        self.t, self.c, self.s, self.m = time.perf_counter(), _cpu_s(), _cpu_s(self.pid), _machine_cpu_s()
        return self

    def __exit__(self, *exc: object) -> None:
        import time

        dt = time.perf_counter() - self.t
        c, s, m = _cpu_s() - self.c, _cpu_s(self.pid) - self.s, _machine_cpu_s() - self.m
        self.client, self.server = c / dt, s / dt
        self.other = max(m - c - s, 0.0) / dt  # cores


# ---------------------------------------------------------------------------------------------- runs

def _summary(shots: object, slo_ms: float, duration: float) -> dict:
    import numpy as np

    st = shots.status  # type: ignore[attr-defined]
    lat = shots.latency_ms  # type: ignore[attr-defined]
    ok = st == 200
    good = ok & (lat <= slo_ms)
    reasons: dict[str, int] = {}
    for i, body in shots.errors.items():  # type: ignore[attr-defined]
        if st[i] == 503:
            try:
                import json

                why = str(json.loads(body).get("error", "?"))
            except ValueError:
                why = "?"
            reasons[why] = reasons.get(why, 0) + 1
    served = lat[ok]
    q = np.percentile(served, [50, 99]) if served.size else [float("nan")] * 2
    import json as _json

    idx = np.array(sorted(shots.bodies), dtype=np.int64)  # type: ignore[attr-defined]
    engine_ms = np.array([_json.loads(shots.bodies[i])["parameters"]["latency_ms"] for i in idx])  # type: ignore[attr-defined]
    outside = lat[idx] - engine_ms if idx.size else np.zeros(0)
    return {"requests": int(st.size), "offered": st.size / duration, "goodput": int(good.sum()) / duration,
            "served": int(ok.sum()) / duration, "served_late": int((ok & ~good).sum()),
            "p50_ms": float(q[0]), "p99_ms": float(q[1]), "dropped": reasons,
            "errors": int(((st != 200) & (st != 503)).sum()),
            "client_lag_p99_ms": float(np.percentile(shots.lag_ms, 99)) if st.size else 0.0,  # type: ignore[attr-defined]
            "engine_p99_ms": float(np.percentile(engine_ms, 99)) if engine_ms.size else float("nan"),
            "engine_late": int((engine_ms > slo_ms).sum()),
            "outside_p50_ms": float(np.percentile(outside, 50)) if outside.size else float("nan"),
            "outside_p99_ms": float(np.percentile(outside, 99)) if outside.size else float("nan"),
            "connections": int(shots.connections)}  # type: ignore[attr-defined]


SETTLE_S = 2.0  # seconds of one-at-a-time requests that refresh a server's measured slowdown (its latest 64 batches)


def _drain(base: str, model: str, timeout_s: float = 10.0) -> dict:
    import time

    from apparate.client.loadgen import server_state

    end = time.monotonic() + timeout_s
    st = server_state(base, model)
    while st.get("queue_depth", 0) and time.monotonic() < end:
        time.sleep(0.05)
        st = server_state(base, model)
    time.sleep(0.3)
    return server_state(base, model)


def find_capacity(base: str, path: str, reqs: list, slo_ms: float, max_batch: int, seed: int, model: str,
                  log: object = print, probe_s: float = 3.0, steps: int = 5) -> tuple[float, list[dict]]:
    """The highest Poisson rate with >= 99% of requests answered within the SLO: bisection between
    0.3 and 1.2 times a closed loop's throughput, the range doubled first while its top still
    passes. A closed loop of 2 x max batch outstanding under-reads a server whose SLO is shorter
    than a full batch (it refuses most of them as overloaded: 12-21 answers/s for a ResNet-56 with
    a 43 ms SLO where this search finds 53-61/s), so its figure only starts the search.

    Each probe starts on a drained queue (`model`: the server's, to read its state), and after
    the closed loop or a failed probe the server is first served one request at a time for
    `SETTLE_S`, unmeasured: its admission scales batch-time predictions by the slowdown of its
    latest 64 batches, which an overload leaves high until they are served anew (on an idle
    ResNet-56 server just after the closed loop, 10 of 63 requests at 24/s were refused)."""
    import numpy as np

    from apparate.client import httpload
    from apparate.client.loadgen import make_trace

    s = httpload.closed_loop(base, path, reqs, 2 * max_batch, probe_s)
    closed = float((s.status == 200).sum() / probe_s)
    log(f"  closed loop ({2 * max_batch} outstanding): {closed:.0f} answers/s")  # type: ignore[operator]
    probes = [{"kind": "closed", "concurrency": 2 * max_batch, "throughput": closed}]

    def settle() -> None:
        _drain(base, model)
        # one request at a time: each finds the engine idle, so admission takes it whatever it
        # predicts, and every answer is a fresh batch time
        httpload.closed_loop(base, path, reqs, 1, SETTLE_S)
        _drain(base, model)

    def within(rate: float, k: int) -> bool:
        times = make_trace("poisson", rate, probe_s, seed + 900 + k)
        sh = httpload.open_loop(base, path, times, reqs)
        share = float(((sh.status == 200) & (sh.latency_ms <= slo_ms)).mean()) if sh.status.size else 0.0
        probes.append({"kind": "open", "rate": rate, "within_slo": share})
        log(f"  {rate:6.0f}/s: {share:.1%} within the SLO")  # type: ignore[operator]
        if share < 0.99:
            settle()
        else:
            _drain(base, model)
        return share >= 0.99

    settle()
    return float(np.floor(search_rate(within, closed, steps))), probes


def search_rate(within: Callable[[float, int], bool], closed: float, steps: int = 5, grow: int = 6) -> float:
    """The highest rate that passes `within(rate, k)` (k: the probe's number): from [0.3, 1.2] x
    `closed`, the range doubled while its top passes (at most `grow` times), then `steps`
    bisections. Returns the highest rate seen to pass (the range's bottom if none did)."""
    lo, hi = 0.3 * max(closed, 1.0), 1.2 * max(closed, 1.0)
    k = 0
    while k < grow and within(hi, k):  # the closed loop under-read it: the range moves up
        lo, hi, k = hi, 2 * hi, k + 1
    for j in range(steps):
        rate = (lo + hi) / 2
        lo, hi = (rate, hi) if within(rate, k + 1 + j) else (lo, rate)
    return lo


def liveness(base: str, model: str, body: bytes, headers: dict[str, str], polls_s: float = 0.002) -> dict:
    """Latency of /v2/health/live (its own connection, polled back to back every `polls_s`)
    while one heavy request is in flight, and before it (idle)."""
    import http.client
    import threading
    import time

    from urllib.parse import urlsplit

    u = urlsplit(base)

    def poll(seconds: float, out: list[float], stop: threading.Event | None = None) -> None:
        c = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end and not (stop is not None and stop.is_set()):
            t = time.perf_counter()
            c.request("GET", "/v2/health/live")
            c.getresponse().read()
            out.append((time.perf_counter() - t) * 1e3)
            time.sleep(polls_s)
        c.close()

    idle: list[float] = []
    poll(0.5, idle)
    busy: list[float] = []
    stop = threading.Event()
    th = threading.Thread(target=poll, args=(30.0, busy, stop))
    th.start()
    time.sleep(0.05)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    t = time.perf_counter()
    c.request("POST", f"/v2/models/{model}/infer", body=body, headers=headers)
    r = c.getresponse()
    r.read()
    heavy_ms = (time.perf_counter() - t) * 1e3
    stop.set()
    th.join()
    c.close()
    return {"status": r.status, "heavy_ms": heavy_ms, "idle_max_ms": max(idle) if idle else float("nan"),
            "busy_max_ms": max(busy) if busy else float("nan"), "busy_polls": len(busy),
            "busy_p50_ms": sorted(busy)[len(busy) // 2] if busy else float("nan")}


def heavy_request(kind: str, shape: tuple, max_inputs: int, max_chars: int = 20000) -> tuple[bytes, dict[str, str]]:
    """The largest request a server admits, in its costliest encoding: JSON FP32 numbers for
    images, max_inputs texts of max_chars characters."""
    import json

    import numpy as np

    if kind == "image":
        data = (np.random.default_rng(0).random((max_inputs, *shape)) * 255).astype(np.float32)
        t = {"name": "input", "shape": [max_inputs, *shape], "datatype": "FP32", "data": data.reshape(-1).tolist()}
    else:
        words = "a gorgeous slow film about nothing at all and everything else ".split()
        text = " ".join(words[i % len(words)] for i in range(max_chars))[:max_chars]
        t = {"name": "text", "shape": [max_inputs], "datatype": "BYTES", "data": [text] * max_inputs}
    return json.dumps({"inputs": [t]}).encode(), {"content-type": "application/json"}


# ---------------------------------------------------------------------------------------------- main

def run(args: argparse.Namespace) -> int:
    import json
    import shlex
    import sys
    import time

    from apparate.model.bundle import read_manifest
    from apparate.client import httpload
    from apparate.client.launch import start_server, stop_server
    from apparate.client.loadgen import make_trace, server_state, stream_payloads

    multiples = [float(x) for x in args.multiples.split(",") if x.strip()]
    if not multiples or min(multiples) <= 0:
        raise ValueError("--multiples must be positive numbers, e.g. 0.5,1,1.5,2,3")
    if args.runs < 1 or args.duration <= 0:
        raise ValueError("--runs must be at least 1 and --duration positive")
    manifest = read_manifest(args.bundle)
    workload = manifest.get("workload") or manifest.get("model", {}).get("workload")
    if not workload:
        raise ValueError("the overload benchmark needs a zoo or hf bundle: its workload supplies the inputs")
    t_all = time.perf_counter()
    n_items = 2000
    payloads = stream_payloads(workload, args.stream_name or None, n_items, args.data_dir, args.seed)
    reqs = [(b.content, b.headers) for b in payloads.bodies]
    extra = ["--threads", str(args.threads), *(["--data-dir", args.data_dir] if args.data_dir else [])]
    for e in args.serve_arg:
        extra += e.split()
    print(f"starting apparate serve {args.bundle} --policy {args.policy} {' '.join(shlex.quote(a) for a in extra)}",
          flush=True)
    proc, base = start_server(args.bundle, args.policy, extra, args.server_log)
    out: dict = {"bundle": args.bundle, "workload": workload, "threads": args.threads, "multiples": multiples,
                 "runs": args.runs, "duration_s": args.duration}
    try:
        st = server_state(base, workload)
        slo = float(st["slo_ms"])
        mb = int(st["batching"]["max_batch"])
        path = f"/v2/models/{workload}/infer"
        out.update(slo_ms=slo, max_batch=mb, profile_before=st["profile"])
        print(f"server at {base}: SLO {slo:.0f} ms, max batch {mb}, {args.threads} torch thread(s); "
              f"inputs: {payloads.workload} stream {payloads.stream}, {len(reqs)} distinct", flush=True)
        if args.warmup > 0:
            httpload.closed_loop(base, path, reqs, 2 * mb, args.warmup)
        if args.capacity:
            cap, probes = float(args.capacity), []
            print(f"capacity: {cap:.0f} requests/s (given)")
        else:
            print("capacity (highest Poisson rate with >= 99% within the SLO):", flush=True)
            cap, probes = find_capacity(base, path, reqs, slo, mb, args.seed, workload)
            print(f"capacity: {cap:.0f} requests/s", flush=True)
        out.update(capacity=cap, capacity_probes=probes)
        _drain(base, workload)
        rows: dict[float, list[dict]] = {m: [] for m in multiples}
        for r in range(args.runs):
            for k, m in enumerate(multiples):
                times = make_trace("poisson", m * cap, args.duration, args.seed + 1000 * (r + 1) + k)
                with CpuMeter(proc.pid) as cpu:
                    shots = httpload.open_loop(base, path, times, reqs, keep_bodies=True,
                                               connections=int(min(max(64, m * cap * slo * 2e-3), 1000)))
                s = _summary(shots, slo, args.duration)
                after = _drain(base, workload)
                s.update(run=r + 1, multiple=m, client_cpu=cpu.client, server_cpu=cpu.server, other_cpu=cpu.other,
                         profile_full_batch_ms=after["profile"][f"vanilla_ms_batch_{mb}"],
                         slowdown=after.get("admission", {}).get("slowdown"),
                         margin=after.get("admission", {}).get("margin"))
                rows[m].append(s)
                print(f"  run {r + 1} {m:g}x ({m * cap:.0f}/s): goodput {s['goodput']:.0f}/s, served {s['served']:.0f}/s, "
                      f"p50 {s['p50_ms']:.1f} p99 {s['p99_ms']:.1f} ms (engine p99 {s['engine_p99_ms']:.1f}, outside "
                      f"p50/p99 {s['outside_p50_ms']:.1f}/{s['outside_p99_ms']:.1f}), 503 {s['dropped']}, "
                      f"CPU client {cpu.client:.2f} server {cpu.server:.2f} other {cpu.other:.2f}", flush=True)
        out["rows"] = {str(m): v for m, v in rows.items()}
        meta = _meta(base, workload)
        p = meta["parameters"]
        shape = tuple(int(x) for x in meta["inputs"][0]["shape"][1:])
        heavy = heavy_request(p["kind"], shape, int(p.get("max_inputs", 64)),
                              int(meta["inputs"][0].get("parameters", {}).get("max_chars", 20000)))
        _drain(base, workload)
        live = liveness(base, workload, *heavy)
        out["liveness"] = live
        out["profile_after"] = server_state(base, workload)["profile"]
    finally:
        stop_server(proc)
    out["wall_s"] = time.perf_counter() - t_all
    print(format_table(out))
    print(f"\ncommand: apparate bench overload {' '.join(shlex.quote(a) for a in sys.argv[3:])}"
          f"  ({out['wall_s']:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=float)
    return 0


def _meta(base: str, model: str) -> dict:
    from apparate.client.loadgen import _get_json

    return _get_json(f"{base}/v2/models/{model}")[1]


def format_table(out: dict) -> str:
    import numpy as np

    cap, slo = out["capacity"], out["slo_ms"]
    lines = [f"\nopen-loop Poisson load on one server (torch threads {out['threads']}, max batch {out['max_batch']}, "
             f"SLO {slo:.0f} ms), client and server on the same machine; capacity {cap:.0f} requests/s; "
             f"{out['runs']} runs of {out['duration_s']:g} s per load, interleaved; goodput = answers within the SLO "
             "per second; latency of what was served, from the scheduled send (medians over the runs); served late: "
             "answered over the SLO (share of requests); outside p99: client latency less the engine's (HTTP, event "
             "loop, client); CPU in cores"]
    head = ("load", "offered/s", "goodput/s (each run)", "goodput/cap", "served/s", "p50 ms", "p99 ms",
            "served late", "outside p99", "503 overloaded", "503 (predicted) late", "CPU client/server/other")
    rows = [head]
    for m, runs in out["rows"].items():
        g = [r["goodput"] for r in runs]
        over = sum(r["dropped"].get("overloaded", 0) for r in runs)
        late = sum(v for r in runs for k, v in r["dropped"].items() if k != "overloaded")
        n = sum(r["requests"] for r in runs)
        rows.append((f"{float(m):g}x", f"{np.mean([r['offered'] for r in runs]):.0f}",
                     " ".join(f"{x:.0f}" for x in g), f"{np.mean(g) / cap:.2f}",
                     f"{np.mean([r['served'] for r in runs]):.0f}", f"{np.median([r['p50_ms'] for r in runs]):.1f}",
                     f"{np.median([r['p99_ms'] for r in runs]):.1f}",
                     f"{sum(r['served_late'] for r in runs) / n:.1%}",
                     f"{np.median([r['outside_p99_ms'] for r in runs]):.1f}", f"{over / n:.1%}", f"{late / n:.1%}",
                     "{:.2f}/{:.2f}/{:.2f}".format(*(np.mean([r[k] for r in runs]) for k in
                                                     ("client_cpu", "server_cpu", "other_cpu")))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(2, "-" * len(lines[1]))
    verdicts = []
    if "3.0" in out["rows"] or "3" in out["rows"]:
        g3 = [r["goodput"] for r in out["rows"].get("3.0", out["rows"].get("3", []))]
        verdicts.append(f"goodput at 3x: {np.mean(g3) / cap:.2f} of capacity (lowest run {min(g3) / cap:.2f}); target >= 0.90")
    if "1.0" in out["rows"] or "1" in out["rows"]:
        g1 = [r["goodput"] for r in out["rows"].get("1.0", out["rows"].get("1", []))]
        verdicts.append(f"1x runs: goodput {' '.join(f'{x:.0f}' for x in g1)}/s, spread (max - min) / mean "
                        f"{(max(g1) - min(g1)) / np.mean(g1):.1%}; target <= 10%")
    mb = out["max_batch"]
    before = out["profile_before"][f"vanilla_ms_batch_{mb}"]
    after = [r["profile_full_batch_ms"] for runs in out["rows"].values() for r in runs]
    verdicts.append(f"profile, full batch: {before:.1f} ms at start, {min(after):.1f}-{max(after):.1f} ms after the runs "
                    f"(measured slowdown wall / predicted: {min(r['slowdown'] or 1 for rs in out['rows'].values() for r in rs):.2f}-"
                    f"{max(r['slowdown'] or 1 for rs in out['rows'].values() for r in rs):.2f})")
    lv = out.get("liveness")
    if lv:
        verdicts.append(f"liveness during the heaviest request ({lv['status']}, {lv['heavy_ms']:.0f} ms): /v2/health/live "
                        f"max {lv['busy_max_ms']:.1f} ms, median {lv['busy_p50_ms']:.1f} ms over {lv['busy_polls']} polls "
                        f"(idle max {lv['idle_max_ms']:.1f} ms)")
    return "\n".join(lines + [""] + verdicts)
