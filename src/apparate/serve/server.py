"""Building a server from a bundle, and running it with uvicorn (foreground or in a thread).

`ServeOptions` mirrors `apparate serve`'s flags. `build_engine` loads the bundle (zoo and
Hugging Face bundles rebuild their model from the data directory), picks the settings and the
SLO, and returns an `Engine`. `run` serves in the foreground until SIGINT/SIGTERM, then shuts
down gracefully: uvicorn stops accepting, finishes the requests in flight, and the engine drains
its queue and writes a last checkpoint. `ServerThread` runs the same app on a background thread
(tests, benchmarks).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apparate.core.settings import Settings

log = logging.getLogger("apparate.serve")
_DEFAULTS = Settings()


@dataclass(frozen=True)
class ServeOptions:
    bundle: str
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str | None = None
    policy: str = "apparate"
    slo_ms: float | None = None  # None: auto (see auto_slo_ms)
    batching: str = "clockwork"
    max_batch: int = 16
    batch_timeout_ms: float = 5.0
    max_queue: int = 1024
    shed: bool = True
    accuracy_constraint: float = _DEFAULTS.accuracy_constraint
    ramp_budget: float = _DEFAULTS.ramp_budget
    state_dir: str | None = None
    checkpoint_every_s: float = 30.0
    threads: int | None = None
    data_dir: str | None = None
    max_body_bytes: int = 16 << 20
    max_inputs: int = 64
    long_text: str = "truncate"
    max_tokens: int | None = None
    access_log: bool = False
    log_level: str = "info"
    port_file: str | None = None
    graceful_timeout_s: float = 30.0
    max_connections: int = 1024
    idle_timeout_s: float = 5.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    grpc_port: int | None = None  # OIP v2 over gRPC on this port as well (0: a free one); None: HTTP only
    allow_load: bool = False  # Triton's load verb: swap in a re-prepared bundle of the model (repository.py)
    device: str = "cpu"  # where the model runs: cpu, cuda, cuda:N, auto (apparate.devices.resolve_device)
    early_stop: bool = False  # released inputs leave their batch's pass while requests wait (early_stop.py)
    stop_sample: float = 0.05  # ... but for this sampled share, which runs to the end (weighted 1/p)
    settings_changes: tuple[tuple[str, Any], ...] = ()  # --set NAME=VALUE: any other controller setting

    def settings(self, kind: str) -> Settings:
        """The controller's settings for a workload of this kind ('image' or 'text')."""
        return Settings.for_kind(kind, **{**dict(self.settings_changes), "accuracy_constraint": self.accuracy_constraint,
                                          "ramp_budget": self.ramp_budget})

    def limits(self) -> Any:
        from .connections import ConnectionLimits

        return ConnectionLimits(self.max_connections, self.idle_timeout_s, self.header_timeout_s, self.body_timeout_s)


def default_threads() -> int:
    """Torch threads for the engine: every core but one, which is left to the HTTP side (event
    loop, parsing, responses) and the controller. On small machines this matters a great deal:
    on 2 cores, a ResNet-56 batch of 8 took 36 ms with 1 thread but up to 2.6 s with 2 while
    another process was busy (OpenMP threads waiting for a descheduled peer)."""
    return max(1, (os.cpu_count() or 2) - 1)


def auto_slo_ms(profile: Any, max_batch: int, length: float | None = None, max_inputs: int = 1,
                max_length: float | None = None, scale: float = 1.0) -> float:
    """Default SLO, rounded up to 10 ms: the largest of
    * 50 ms;
    * three times the bare model's time for a full batch of typical inputs (a request may wait
      for the running batch, then run in the next one); for text, `length` is the typical token
      count (the bootstrap inputs' median);
    * 1.5 times what the largest request the server admits (`max_inputs` inputs, for text each
      `max_length` tokens long) takes when it arrives just as a full batch of such inputs
      starts: it waits for that batch, then runs in ceil(max_inputs / max_batch) batches of its
      own. Without this a valid request of many inputs could never meet the SLO. The margin is
      for a machine busier than the one the bundle was profiled on.
    `scale` multiplies the profile's times: how much longer batches took when the server measured
    them at start (`startup.measure_batches`), so the SLO fits what serving here costs.
    """
    typical = 3.0 * float(profile.vanilla(max_batch, length)) * scale
    full, rest = divmod(max(int(max_inputs), 1), max_batch)
    one = float(profile.vanilla(max_batch, max_length)) * scale
    largest = full * one + (float(profile.vanilla(rest, max_length)) * scale if rest else 0.0)
    ms = max(50.0, typical, 1.5 * (one + largest))
    return float(-(-ms // 10) * 10)


def build_engine(opts: ServeOptions) -> Any:
    from .engine import Engine

    return Engine(*engine_parts(opts))


def engine_parts(opts: ServeOptions) -> tuple[Any, Any, Any]:
    """What `Engine(...)` takes for these options: the served model (the bundle loaded), the
    engine's options and the control loop's. Also what each cluster replica builds."""
    import numpy as np
    import torch

    from .control import ControlOptions
    from .engine import EngineOptions
    from .scheduler import BatchingOptions

    threads = opts.threads or default_threads()
    torch.set_num_threads(threads)
    served = served_model(opts, opts.bundle)
    rec = served.recording
    typical = float(np.median(rec.lengths)) if served.kind == "text" and rec is not None and rec.lengths is not None \
        and len(rec.lengths) else None
    max_len = float(served.codec.max_tokens) if served.kind == "text" else None  # type: ignore[union-attr]
    slo = opts.slo_ms if opts.slo_ms else auto_slo_ms(served.profile, opts.max_batch, typical, opts.max_inputs, max_len)
    slo_auto = None if opts.slo_ms else functools.partial(auto_slo_ms, served.profile, opts.max_batch, typical,
                                                          opts.max_inputs, max_len)
    if not opts.slo_ms:
        log.info("SLO %.0f ms (auto: it fits the largest request admitted, %d inputs%s; --slo-ms sets another, and "
                 "then larger requests are refused with 413)", slo, opts.max_inputs,
                 f" of {max_len:.0f} tokens" if max_len else "")
    eo = EngineOptions(
        batching=BatchingOptions(opts.batching, opts.max_batch, opts.shed, opts.batch_timeout_ms),
        slo_ms=slo, slo_auto=slo_auto, max_queue=opts.max_queue, threads=threads, early_stop=opts.early_stop, stop_sample=opts.stop_sample)
    # every batch's feedback goes to the controller as served, as the replay gives it (control.py)
    co = ControlOptions(policy=opts.policy, settings=opts.settings(served.kind),
                        state_dir=opts.state_dir, checkpoint_every_s=opts.checkpoint_every_s)
    return served, eo, co


def served_model(opts: ServeOptions, bundle: str, name: str | None = None) -> Any:
    """The ServedModel of a bundle as `opts` serve it (a swapped-in bundle keeps the served name)."""
    from apparate.zoo.bundles import load_bundle

    from .model_io import ServedModel

    from apparate.devices import resolve_device

    b = load_bundle(bundle, data_dir=opts.data_dir, device=resolve_device(opts.device))
    return ServedModel.from_bundle(b, name=name or opts.model_name, max_tokens=opts.max_tokens,
                                   long_text=opts.long_text, max_inputs=opts.max_inputs)


def repository_for(engine: Any, opts: ServeOptions) -> Any:
    """The load verb's `Repository` when `opts.allow_load`, else None."""
    if not opts.allow_load:
        return None
    from .repository import Repository

    return Repository(engine, lambda path: served_model(opts, path, engine.served.name))


def _raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard one (each connection holds one); return it."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            want = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        return int(soft)
    except (ImportError, ValueError, OSError):
        return 1024


def freeze_heap() -> None:
    """Move every object alive now (the model, torch, the libraries: several hundred thousand)
    out of the garbage collector's reach. Without this a full collection traversed them all
    while serving: 60-115 ms with every thread stopped, several times a minute under load,
    longer than the whole SLO of a ResNet-20 server. What is allocated later (requests,
    answers, batches) is collected as usual."""
    import gc

    gc.collect()
    gc.freeze()


def watch_gc(metrics: Any) -> None:
    """Time every garbage collection into `apparate_gc_pause_seconds` (process-wide: the CLI
    server's process holds one engine); pauses over 20 ms are logged."""
    import gc

    started = [0.0]

    def timer(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        dt = time.perf_counter() - started[0]
        metrics.gc_pause.observe(dt)
        if dt > 0.02:
            log.warning("garbage collection (generation %d) stopped every thread for %.0f ms", info["generation"], dt * 1e3)

    gc.callbacks.append(timer)


def uvicorn_config(app: Any, host: str, port: int, access_log: bool = False, log_level: str = "warning",
                   graceful_timeout_s: float = 30.0) -> Any:
    """uvicorn settings for an app made by `create_app`: its connection limits (connections.py)
    replace uvicorn's `limit_concurrency`, whose refusals were plain text and hit health checks."""
    import uvicorn

    from .connections import ConnectionLimits, protocol_class

    limits = getattr(app, "limits", None) or ConnectionLimits()
    files = _raise_fd_limit()
    if limits.max_connections > files - 64:  # past the file limit accept() fails and nobody gets an answer
        from dataclasses import replace

        log.warning("at most %d connections: the open-file limit is %d", max(files - 64, 1), files)
        limits = replace(limits, max_connections=max(files - 64, 1))
    return uvicorn.Config(app, host=host, port=port, access_log=access_log, log_level=log_level, lifespan="on",
                          timeout_graceful_shutdown=graceful_timeout_s, server_header=False,
                          http=protocol_class(limits, app), timeout_keep_alive=limits.idle_timeout_s)


def bound_port(server: Any) -> int:
    for s in server.servers:
        for sock in s.sockets:
            return int(sock.getsockname()[1])
    raise RuntimeError("the server has no listening socket")


def run(opts: ServeOptions) -> int:
    """Serve in the foreground until interrupted."""
    import asyncio

    import uvicorn

    from .app import create_app

    logging.basicConfig(level=getattr(logging, opts.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    engine = build_engine(opts)
    engine.start()
    freeze_heap()
    watch_gc(engine.metrics)
    repo = repository_for(engine, opts)
    app = create_app(engine, opts.max_body_bytes, manage_engine=True, limits=opts.limits(), repository=repo)
    server = uvicorn.Server(uvicorn_config(app, opts.host, opts.port, opts.access_log, "warning", opts.graceful_timeout_s))
    grpc = grpc_thread(engine, opts, repo)

    async def main() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started:
            port = bound_port(server)
            url = f"http://{opts.host}:{port}"
            if grpc is not None:
                grpc.start()
            d = engine.describe()
            log.info("serving %s at %s/v2/models/%s (policy %s, ramps %s, SLO %.0f ms, %d torch threads, ready in %.1f s)",
                     engine.served.name, url, engine.served.name, d["policy"], d["config"]["sites"],
                     engine.options.slo_ms, engine.options.threads, time.perf_counter() - t0)
            if opts.port_file:
                tmp = Path(opts.port_file + ".tmp")
                tmp.write_text(json.dumps({"url": url, "port": port, "model": engine.served.name, "pid": os.getpid(),
                                           **({"grpc": grpc.url, "grpc_port": grpc.port} if grpc else {})}))
                os.replace(tmp, opts.port_file)
        await task

    # uvicorn handles SIGINT/SIGTERM itself (graceful shutdown), then re-raises the signal to the
    # handler it found installed: make that one end the process quietly with status 0.
    def stopped(signum: int, frame: Any) -> None:
        raise _Stopped(signum)

    previous = {sig: signal.signal(sig, stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        # The loop uvicorn would pick (uvloop when installed): asyncio.run alone gives the default one.
        with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
            runner.run(main())
    except _Stopped:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if engine.running:  # the lifespan did not run (startup failed): still stop cleanly
            engine.stop(True)
        if grpc is not None:  # the engine has answered every admitted call by now
            grpc.stop(1.0)
    log.info("stopped")
    return 0


class _Stopped(Exception):
    pass


def grpc_thread(engine: Any, opts: ServeOptions, repository: Any = None) -> Any:
    """The gRPC server `opts.grpc_port` asks for (not started), or None."""
    if opts.grpc_port is None:
        return None
    from .grpc_server import GrpcThread

    return GrpcThread(engine, opts.host, opts.grpc_port, repository, max_message_bytes=opts.max_body_bytes)


def serve_in_thread(opts: ServeOptions, timeout: float = 120.0) -> "ServerThread":
    """`apparate serve` inside this process: the engine built from `opts`, its HTTP app on a
    uvicorn thread (port 0: a free one, read back as `.port` / `.url`), the engine in
    `.engine` for in-process submits. Started; stop with `.stop()` or use it as a context
    manager. The process's signals and garbage collector are left alone (they are the caller's)."""
    from .app import create_app

    engine = build_engine(opts)
    repo = repository_for(engine, opts)
    app = create_app(engine, opts.max_body_bytes, manage_engine=True, limits=opts.limits(), repository=repo)
    server = ServerThread(app, opts.host, opts.port, opts.graceful_timeout_s)
    server.engine = engine
    server.grpc = grpc_thread(engine, opts, repo)
    try:
        server.start(timeout)
        if server.grpc is not None:
            server.grpc.start(timeout)
        return server
    except BaseException:
        if engine.running:
            engine.stop(False)
        raise


class ServerThread:
    """An app served by uvicorn on a background thread, on a free loopback port by default."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, graceful_timeout_s: float = 30.0):
        import uvicorn

        self.server = uvicorn.Server(uvicorn_config(app, host, port, graceful_timeout_s=graceful_timeout_s))
        self.host = host
        self.port: int | None = None
        self.engine: Any = None  # set by serve_in_thread
        self.grpc: Any = None  # the GrpcThread serve_in_thread started, if any
        self._thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def start(self, timeout: float = 60.0) -> "ServerThread":
        if self.port is not None:  # already started (serve_in_thread, then `with`)
            return self
        self._thread.start()
        end = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        self.port = bound_port(self.server)
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        if self.grpc is not None:
            self.grpc.stop(1.0)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
