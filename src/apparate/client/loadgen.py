"""Open-loop HTTP load: a trace of arrival times, one real HTTP request per arrival, on loopback.

Each arrival sends one input (a stream item, in stream order, cycling if the trace is longer)
at its scheduled time whether or not earlier requests have been answered (open loop: a slow
server gets a growing backlog, as in production, instead of a politely waiting client).
Latency is measured from the scheduled send time to the response, so client lag counts
against the server too; the report shows that lag so it can be told apart.

Accuracy against the original model cannot be known by the client (only the server sees each
input's final answer, when its batch ends), so it is read from the server: the `total` counters
of `/earlyexit` before and after the measured run give exactly the agreement of the answers
released during it. Ground-truth accuracy is computed by the client from the stream's labels.

Comparisons serve the same trace (same arrival times, same inputs, same seed) to each server
one after the other, never at once: two servers sharing the cores would slow each other. With
`rounds` > 1 the order alternates A B A B ... and results are pooled per server.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np


# ---------------------------------------------------------------------------------------------- inputs

@dataclass
class Payloads:
    bodies: list[Body]  # one OIP request per stream item
    labels: np.ndarray  # ground truth per item (-1 unknown)
    stream: str
    workload: str


@dataclass(frozen=True)
class Body:
    content: bytes
    headers: dict[str, str]


def image_body(img: np.ndarray, input_name: str = "input", binary: bool = True) -> Body:
    """One image as an OIP request: raw bytes (binary tensor extension) or JSON numbers."""
    h, w, c = img.shape
    tensor: dict[str, Any] = {"name": input_name, "shape": [1, h, w, c], "datatype": "UINT8"}
    if not binary:
        tensor["data"] = img.reshape(-1).tolist()
        return Body(json.dumps({"inputs": [tensor]}, separators=(",", ":")).encode(), JSON_HEADERS)
    raw = np.ascontiguousarray(img, dtype=np.uint8).tobytes()
    tensor["parameters"] = {"binary_data_size": len(raw)}
    head = json.dumps({"inputs": [tensor]}, separators=(",", ":")).encode()
    return Body(head + raw, {"content-type": "application/octet-stream",
                             "inference-header-content-length": str(len(head))})


def text_body(text: str, input_name: str = "text") -> Body:
    return Body(json.dumps({"inputs": [{"name": input_name, "shape": [1], "datatype": "BYTES", "data": [text]}]},
                           separators=(",", ":")).encode(), JSON_HEADERS)


JSON_HEADERS = {"content-type": "application/json"}


def stream_payloads(workload: str, stream: str | None, n: int, data_dir: str | None = None, seed: int = 0,
                    binary: bool = True) -> Payloads:
    """Request bodies for the first n items of a zoo workload's stream (cycled if shorter)."""
    from apparate.zoo.own_streams import is_own_stream, resolve_stream
    from apparate.zoo.workloads import get_workload

    wl = get_workload(workload, data_dir, progress=False)
    name = stream or ("camera-day" if wl.kind == "image" else "sst2-dev")
    s = resolve_stream(wl, name, seed=seed, n=n if is_own_stream(name) else None)
    k = min(len(s), n)
    if wl.kind == "image":
        bodies = [image_body(np.asarray(s.inputs[i]), binary=binary) for i in range(k)]
    else:
        bodies = [text_body(s.inputs[i]) for i in range(k)]
    return Payloads(bodies, np.asarray(s.labels[:k]), name, workload)


def make_trace(kind: str, rate: float | None, duration: float | None, seed: int = 0, cv: float = 2.0,
               data_dir: str | None = None) -> np.ndarray:
    """Arrival times (s) for `apparate loadgen`: any `--trace` value (`zoo.trace_specs`)."""
    return fitted_trace(kind, rate, duration, seed, cv, data_dir).times


def fitted_trace(kind: str, rate: float | None, duration: float | None, seed: int = 0, cv: float = 2.0,
                 data_dir: str | None = None) -> Any:
    """`trace_specs.make` for a run of `duration` seconds (None: a real trace whole; synthetic 30 s)."""
    from apparate.zoo import trace_specs

    if duration is None and not trace_specs.is_real(kind):
        duration = 30.0
    return trace_specs.make(kind, duration=duration, rate=rate, seed=seed, cv=cv, data_dir=data_dir)


# ---------------------------------------------------------------------------------------------- running

@dataclass
class Outcome:
    status: int = 0  # HTTP status, 0 = no response (connection error, timeout)
    latency_ms: float = float("nan")  # scheduled send -> response
    lag_ms: float = 0.0  # scheduled send -> actually sent (client lag)
    label: int = -1
    exit_site: int = -1
    early: bool = False
    server_ms: float = float("nan")
    error: str = ""


@dataclass
class RunResult:
    name: str
    outcomes: list[Outcome]
    labels: np.ndarray  # ground truth of each request's input
    span_s: float  # first scheduled send -> last response
    server_before: dict[str, Any] = field(default_factory=dict)
    server_after: dict[str, Any] = field(default_factory=dict)


def model_url(base: str, model: str | None) -> tuple[str, str]:
    """(base URL, model name) from `http://host:port` + name or `http://host:port/v2/models/NAME`."""
    base = base.rstrip("/")
    if "/v2/models/" in base:
        root, name = base.split("/v2/models/", 1)
        return root, name.split("/")[0]
    if not model:
        raise ValueError("give the model name (--model) or a URL ending in /v2/models/NAME")
    return base, model


async def _send(session: Any, url: str, body: Body, t_sched: float, out: Outcome) -> None:
    import aiohttp

    out.lag_ms = (time.perf_counter() - t_sched) * 1e3
    try:
        async with session.post(url, data=body.content, headers=body.headers) as r:
            raw = await r.read()
        out.latency_ms = (time.perf_counter() - t_sched) * 1e3
        out.status = r.status
        data = json.loads(raw)
        if r.status == 200:
            p = data.get("parameters", {})
            out.exit_site = int(p.get("exit_site", -1))
            out.early = bool(p.get("early_exit", False))
            out.server_ms = float(p.get("latency_ms", float("nan")))
            for o in data.get("outputs", []):
                if o.get("name") == "label":
                    out.label = int(o["data"][0])
        else:
            out.error = str(data.get("error", ""))[:120]
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        out.latency_ms = (time.perf_counter() - t_sched) * 1e3
        out.error = type(e).__name__


async def run_trace(base: str, model: str, times: np.ndarray, bodies: Sequence[Body], timeout_s: float = 60.0,
                    progress: bool = True, desc: str = "", offset: int = 0) -> tuple[list[Outcome], float]:
    """Send bodies[(offset + i) % len] at times[i] (s from now); wait for every response.

    aiohttp rather than httpx: on a 2-core machine shared with the server, the client's own CPU
    matters, and aiohttp's C parser costs about a third of httpx's per request (1.1 vs 3.1 ms
    measured here).
    """
    import aiohttp
    from tqdm.auto import tqdm

    url = f"{base}/v2/models/{model}/infer"
    outs = [Outcome() for _ in range(len(times))]
    bar = tqdm(total=len(times), desc=desc, unit="req", disable=None if progress else True, mininterval=0.5,
               leave=False)
    connector = aiohttp.TCPConnector(limit=1024)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        t0 = time.perf_counter() + 0.05
        tasks = []

        def done(_t: Any) -> None:
            bar.update(1)

        for i, t in enumerate(np.asarray(times, dtype=np.float64).tolist()):
            delay = t0 + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(_send(session, url, bodies[(offset + i) % len(bodies)], t0 + t, outs[i]))
            task.add_done_callback(done)
            tasks.append(task)
        await asyncio.gather(*tasks)
        span = time.perf_counter() - t0
    bar.close()
    return outs, span


def _get_json(url: str, timeout_s: float = 30.0) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, None


def server_state(base: str, model: str) -> dict[str, Any]:
    status, data = _get_json(f"{base}/v2/models/{model}/earlyexit")
    if status != 200:
        raise RuntimeError(f"{base}: /earlyexit answered {status}")
    return data


def wait_ready(base: str, timeout_s: float = 600.0, proc: Any = None) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            if _get_json(f"{base}/v2/health/ready", 5)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{base} not ready after {timeout_s:.0f} s")


def measure(name: str, base: str, model: str, times: np.ndarray, payloads: Payloads, warmup_s: float,
            rate: float, progress: bool = True, timeout_s: float = 60.0) -> RunResult:
    """Warm up (not measured), then run the trace against one server."""
    if warmup_s > 0:
        wt = np.arange(int(warmup_s * rate)) / rate
        asyncio.run(run_trace(base, model, wt, payloads.bodies, timeout_s, progress, f"{name} warm-up",
                              offset=len(times)))
    before = server_state(base, model)
    outs, span = asyncio.run(run_trace(base, model, times, payloads.bodies, timeout_s, progress, name))
    time.sleep(0.2)  # the last batch's accounting lands just after its last answer
    after = server_state(base, model)
    labels = payloads.labels[np.arange(len(times)) % len(payloads.labels)]
    return RunResult(name, outs, labels, span, before, after)


# ---------------------------------------------------------------------------------------------- report

def same_answers(results: Sequence[RunResult], reference: Sequence[RunResult]) -> float:
    """Share of the requests both servers answered where the answer equals the reference
    server's (vanilla's: the original model's) for the same input: run k against run k, request
    i against request i (the same trace and inputs). The client's own accuracy measure, for
    servers whose `accuracy vs original` cannot count every answer (with early stop the final
    answer of an input that left its batch is never computed)."""
    same = both = 0
    for r, ref in zip(results, reference):
        for o, q in zip(r.outcomes, ref.outcomes):
            if o.status == 200 and q.status == 200:
                both += 1
                same += int(o.label == q.label)
    return same / both if both else float("nan")


def summarize(results: Sequence[RunResult], slo_ms: float | None = None) -> dict[str, Any]:
    """Pooled figures over one or more runs against the same server."""
    outs = [o for r in results for o in r.outcomes]
    labels = np.concatenate([r.labels for r in results]) if results else np.zeros(0)
    span = sum(r.span_s for r in results)
    status = np.array([o.status for o in outs])
    ok = status == 200
    lat = np.array([o.latency_ms for o in outs])[ok]
    slo = slo_ms if slo_ms is not None else (results[0].server_after.get("slo_ms") if results else None)
    out: dict[str, Any] = {"requests": len(outs), "ok": int(ok.sum())}
    q = np.percentile(lat, [50, 95, 99]) if lat.size else [float("nan")] * 3
    out.update(p50_ms=float(q[0]), p95_ms=float(q[1]), p99_ms=float(q[2]),
               mean_ms=float(lat.mean()) if lat.size else float("nan"))
    out["throughput"] = float(ok.sum() / span) if span > 0 else 0.0
    out["goodput"] = float((lat <= slo).sum() / span) if span > 0 and slo else float("nan")
    out["slo_ms"] = slo
    out["dropped_503"] = int((status == 503).sum())
    reasons: dict[str, int] = {}
    for o in outs:
        if o.status == 503:
            reasons[o.error] = reasons.get(o.error, 0) + 1
    out["drop_reasons"] = reasons
    out["errors"] = int(((status != 200) & (status != 503)).sum())
    err_kinds: dict[str, int] = {}
    for o in outs:
        if o.status not in (200, 503):
            k = f"{o.status or 'no response'} {o.error}".strip()
            err_kinds[k] = err_kinds.get(k, 0) + 1
    out["error_kinds"] = err_kinds
    exits: dict[str, int] = {}
    for o in outs:
        if o.status == 200:
            k = "final" if o.exit_site < 0 else str(o.exit_site)
            exits[k] = exits.get(k, 0) + 1
    out["exits"] = dict(sorted(exits.items(), key=lambda kv: (kv[0] == "final", int(kv[0]) if kv[0] != "final" else 0)))
    out["early_share"] = float(np.mean([o.early for o in outs if o.status == 200])) if ok.any() else 0.0
    pred = np.array([o.label for o in outs])
    known = ok & (labels >= 0)
    out["label_accuracy"] = float((pred[known] == labels[known]).mean()) if known.any() else float("nan")
    inputs = agree = 0
    for r in results:
        a, b = r.server_before.get("total", {}), r.server_after.get("total", {})
        inputs += int(b.get("inputs", 0)) - int(a.get("inputs", 0))
        agree += int(b.get("agree", 0)) - int(a.get("agree", 0))
    out["server_inputs"] = inputs
    stop: dict[str, int] = {}  # early stop over the measured runs: rows that left, and ran again (its pool)
    for r in results:
        a, b = r.server_before.get("early_stop", {}), r.server_after.get("early_stop", {})
        for key, got in (("left", "rows_left"), ("run again", "rows_rerun")):
            stop[key] = stop.get(key, 0) + int(b.get(got, 0)) - int(a.get(got, 0))
        if "pool" in b:
            stop["of which while work waited"] = stop.get("of which while work waited", 0) + \
                int(b["pool"].get("forced", 0)) - int(a.get("pool", {}).get("forced", 0))
    out["early_stop"] = {k: v for k, v in stop.items() if v or k == "left"} if any(stop.values()) else {}
    out["accuracy_vs_original"] = agree / inputs if inputs else float("nan")
    lag = np.array([o.lag_ms for o in outs])
    out["client_lag_p99_ms"] = float(np.percentile(lag, 99)) if lag.size else 0.0
    if results:
        after = results[-1].server_after
        out["ramps"] = after.get("config", {}).get("sites")
        out["thresholds"] = [round(t, 4) for t in after.get("config", {}).get("thresholds", [])]
    return out


ROWS = (("requests", "requests", "{:.0f}"), ("ok (200)", "ok", "{:.0f}"), ("throughput (answers/s)", "throughput", "{:.1f}"),
        ("goodput (within SLO, /s)", "goodput", "{:.1f}"), ("p50 latency (ms)", "p50_ms", "{:.1f}"),
        ("p95 latency (ms)", "p95_ms", "{:.1f}"), ("p99 latency (ms)", "p99_ms", "{:.1f}"),
        ("mean latency (ms)", "mean_ms", "{:.1f}"), ("dropped (503)", "dropped_503", "{:.0f}"),
        ("errors", "errors", "{:.0f}"), ("released early", "early_share", "{:.1%}"),
        ("accuracy vs original", "accuracy_vs_original", "{:.2%}"),
        ("same answer as vanilla", "same_as_reference", "{:.2%}"), ("label accuracy", "label_accuracy", "{:.2%}"),
        ("client lag p99 (ms)", "client_lag_p99_ms", "{:.1f}"))


def _fmt(fmt: str, v: Any) -> str:
    try:
        return fmt.format(v) if v is not None and v == v else "n/a"
    except (TypeError, ValueError):
        return str(v)


def format_report(summaries: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """A table, one column per server, plus the ratio of each later one to the first."""
    names = [n for n, _ in summaries]
    k = len(summaries)
    head = ["metric", *names] + (["ratio"] if k == 2 else [f"{n}/{names[0]}" for n in names[1:]])
    rows = [head]
    for label, key, fmt in ROWS:
        vals = [s.get(key) for _, s in summaries]
        row = [label, *(_fmt(fmt, v) for v in vals)]
        a = vals[0]
        for b in vals[1:]:
            row.append(f"{b / a:.3f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a and a == a and b == b
                       and key not in ("requests", "ok", "dropped_503", "errors") else "")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    extra = []
    for n, s in summaries:
        extra.append(f"{n}: exits {s.get('exits')}; ramps {s.get('ramps')} thresholds {s.get('thresholds')}"
                     + (f"; 503 reasons {s['drop_reasons']}" if s.get("drop_reasons") else "")
                     + (f"; early stop rows {s['early_stop']}" if s.get("early_stop") else "")
                     + (f"; errors {s['error_kinds']}" if s.get("error_kinds") else ""))
    return "\n".join(lines + extra)


Progress = Callable[[str], None]
