"""The HTTP API (Starlette): Open Inference Protocol v2 plus early-exit state and metrics.

    GET  /v2                                    server metadata
    GET  /v2/health/live                        200 while the process serves HTTP
    GET  /v2/health/ready                       200 once the engine is warm and running, else 503
    GET  /v2/models/{name}[/versions/1]         model metadata (inputs, outputs, parameters)
    GET  /v2/models/{name}[/versions/1]/ready   model readiness
    POST /v2/models/{name}[/versions/1]/infer   inference (see protocol.py)
    GET  /v2/models/{name}/earlyexit            live state: ramps, thresholds, accuracy, exit rates
    POST /v2/repository/index                   Triton's repository index: the model and its state
    POST /v2/repository/models/{name}/load      swap in a re-prepared bundle (`--allow-load`; repository.py)
    GET  /metrics                               Prometheus text format

Errors are JSON `{"error": "..."}`: 400 malformed JSON or a bad input tensor, 404 unknown model
or path, 405 wrong method, 408 a request not received in time, 413 a body over the size limit
or a request too large to meet the SLO even on an idle server, 503 overload (queue full, the
queue already holds more work than the request's deadline allows, too many connections) or
shutting down, 500 an internal or model error. A bad request never reaches the engine, so
nothing else is disturbed.

`Front`, a plain ASGI layer in front of Starlette, does what must stay cheap whatever the load:
it answers the health endpoints without routing, refuses an infer request the engine could not
serve in time *before its body is read or parsed* (refusing then costs a few tens of
microseconds of the event loop instead of the milliseconds parsing takes, CPU that serving
needs when the server is past capacity), and counts every response in
`apparate_http_requests_total{code, route}`. A request's deadline counts from when it reached
`Front`, plus the time its decoding took: waiting for the event loop and reading the body count
against the SLO, as they do for the client, but decoding does not (a client's choice of JSON
numbers over binary tensors is not the server's to pay for out of the SLO). Parsing that
can take milliseconds (large JSON tensors, tokenizing) runs on a worker thread, so the event
loop, and with it liveness, keeps answering.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import time
from typing import Any, Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .connections import HEALTH_LIVE, HEALTH_READY, ConnectionLimits, route_of
from .engine import Engine
from .model_io import InputError
from .protocol import HEADER_LENGTH, attach_binary, decode_json, infer_response, model_metadata, parse_infer, split_binary
from .requests import Rejected

log = logging.getLogger("apparate.serve")

ARRIVAL = "apparate.arrival"  # scope key: perf_counter time the request reached Front
OFFLOAD_BYTES = 32 << 10  # bodies at least this large are decoded on the worker thread


class TooLarge(Exception):
    pass


class TooSlow(Exception):
    pass


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status_code=status, media_type="application/json",
                    headers=headers)


def _error(msg: str, status: int, headers: dict[str, str] | None = None) -> Response:
    return _json({"error": msg}, status, headers)


RETRY = {"retry-after": "1"}  # 503s for overload: retrying later may succeed


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise TooLarge
        except ValueError:
            pass
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise TooLarge
                chunks.append(chunk)
    except TimeoutError:
        raise TooSlow from None
    return b"".join(chunks)


async def send_json(send: Callable[[dict], Awaitable[None]], status: int, body: bytes,
                    headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    """A complete JSON response straight through ASGI (no framework in the way)."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class Front:
    """The ASGI app the server runs: the fast paths, then Starlette for everything else."""

    def __init__(self, app: Starlette, engine: Engine, limits: ConnectionLimits):
        self.app = app
        self.engine = engine
        self.metrics = engine.metrics
        self.limits = limits
        name = engine.served.name
        self.infer_paths = frozenset({f"/v2/models/{name}/infer", f"/v2/models/{name}/versions/1/infer"})
        self._refusals: dict[str, bytes] = {}
        self._counters: dict[tuple[int, str], Any] = {}

    def count(self, status: int, route: str) -> None:
        c = self._counters.get((status, route))
        if c is None:
            c = self._counters[(status, route)] = self.metrics.http.labels(str(status), route)
        c.inc()

    def ready(self) -> bool:
        return bool(self.engine.ready and self.engine.running)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope["path"]
        if (path == HEALTH_LIVE or path == HEALTH_READY) and scope["method"] == "GET":
            ok = path == HEALTH_LIVE or self.ready()
            body = b'{"live":true}' if path == HEALTH_LIVE else (b'{"ready":true}' if ok else b'{"ready":false}')
            status = 200 if ok else 503
            await send_json(send, status, body)
            self.count(status, "health")
            return
        route = route_of(path)
        if route == "infer" and path in self.infer_paths and scope["method"] == "POST":
            why = self.engine.admission.refusal(t0)
            if why is not None:
                self.engine.metrics.drop(why)
                body = self._refusals.get(why)
                if body is None:
                    body = self._refusals[why] = json.dumps({"error": why}).encode()
                await send_json(send, 503, body, ((b"retry-after", b"1"),))
                self.count(503, route)
                return
        scope[ARRIVAL] = t0
        status = [500]

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.count(status[0], route)


def create_app(engine: Engine, max_body_bytes: int = 16 << 20, manage_engine: bool = True,
               limits: ConnectionLimits | None = None, offload_bytes: int = OFFLOAD_BYTES,
               repository: Any = None) -> Front:
    """The ASGI app over an engine. With `manage_engine` the app's lifespan starts the engine
    (if it is not running) and stops it at shutdown, after uvicorn has finished the requests in
    flight, draining whatever is still queued. Request bodies of at least `offload_bytes` are
    decoded and validated on a worker thread (0: every body). With a `repository.Repository`,
    Triton's load verb swaps in re-prepared bundles."""
    metrics = engine.metrics
    policy = engine.control.options.policy
    limits = limits or ConnectionLimits()
    # One thread: decoding is bounded CPU work; requests that need it wait their turn rather
    # than competing with the engine for the cores.
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="apparate-decode")

    def check_model(request: Request) -> None:
        served = engine.served  # read per request: a load may swap in another bundle of the model
        name = request.path_params["name"]
        version = request.path_params.get("version")
        if name != served.name or (version is not None and version != "1"):
            what = f"model {name!r}" + (f" version {version!r}" if version is not None else "")
            raise HTTPException(404, f"unknown {what}; this server serves {served.name!r} (version 1)")

    async def server_meta(request: Request) -> Response:
        from apparate import __version__

        return _json({"name": "apparate", "version": __version__, "extensions": ["earlyexit", "binary_tensor_data", "model_repository"]})

    def is_ready() -> bool:
        return bool(engine.ready and engine.running)

    async def model_ready(request: Request) -> Response:
        check_model(request)
        ok = is_ready()
        return _json({"name": engine.served.name, "ready": ok}, 200 if ok else 503)

    async def metadata(request: Request) -> Response:
        check_model(request)
        return _json(model_metadata(engine.served, policy))

    async def earlyexit(request: Request) -> Response:
        check_model(request)
        return _json(engine.describe())

    async def repository_index(request: Request) -> Response:
        from .repository import index

        body = await request.body()
        try:
            args = json.loads(body) if body.strip() else {}
        except ValueError as e:
            return _error(f"malformed JSON: {e}", 400)
        ready = args.get("ready", False) if isinstance(args, dict) else None
        if not isinstance(ready, bool):
            return _error("the body must be a JSON object, optionally with a boolean 'ready'", 400)
        return _json(index(engine, ready_only=ready))

    async def load(request: Request) -> Response:
        from .repository import load_parameters

        if repository is None:
            return _error("loading bundles is off: start the server with --allow-load", 403)
        try:
            args = json.loads(await request.body() or b"{}")
            bundle = load_parameters(args.get("parameters", {}) if isinstance(args, dict) else None)
            await asyncio.to_thread(repository.load, request.path_params["name"], bundle)
        except LookupError as e:
            return _error(str(e.args[0]), 404)
        except (ValueError, FileNotFoundError) as e:
            return _error(str(e), 400)
        return _json({})

    async def prom(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def decode(body: bytes, header_length: str | None, worker: bool) -> Any:
        """Body -> InferRequest (raises InputError). On the worker thread, large JSON tensors are
        decoded piecewise so that the event loop gets the GIL back between pieces."""
        head, raw = split_binary(body, header_length)
        try:
            payload = decode_json(head, piecewise=worker)
        except RecursionError:
            raise InputError("malformed JSON: nested too deeply") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise InputError(f"malformed JSON: {e}") from None
        attach_binary(payload, raw)
        served = engine.served
        return parse_infer(payload, served.codec, served.class_names)

    async def infer(request: Request) -> Response:
        try:
            check_model(request)
        except HTTPException as e:
            return _error(str(e.detail), e.status_code)
        why = engine.admission.refusal()  # the queue may have filled while the request waited for its turn
        if why is not None:
            engine.metrics.drop(why)
            return _error(why, 503, RETRY)
        try:
            body = await _read_body(request, max_body_bytes, limits.body_timeout_s)
        except TooLarge:
            return _error(f"request body over the limit of {max_body_bytes} bytes", 413)
        except TooSlow:
            return _error(f"request body not received within {limits.body_timeout_s:g} s", 408, {"connection": "close"})
        hl = request.headers.get(HEADER_LENGTH)
        t = time.perf_counter()
        try:
            if len(body) >= offload_bytes:
                req = await asyncio.get_running_loop().run_in_executor(pool, decode, body, hl, True)
            else:
                req = decode(body, hl, False)
        except InputError as e:
            return _error(str(e), 400)
        arrival = request.scope.get(ARRIVAL)
        results = await engine.infer(req.items, req.costs,
                                     None if arrival is None else arrival + (time.perf_counter() - t))
        bad = [r for r in results if isinstance(r, Rejected)]
        if bad:  # one input refused or failed: the request is (the answers of the others are dropped)
            worst = max(bad, key=lambda r: r.status)
            return _error(worst.reason, worst.status, RETRY if worst.status == 503 else None)
        served = engine.served
        return _json(infer_response(served.name, req, results, served.class_names))  # type: ignore[arg-type]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(str(exc.detail), exc.status_code)

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("error handling %s %s", request.method, request.url.path, exc_info=exc)
        metrics.error("http")
        return _error(f"internal error: {type(exc).__name__}", 500)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):  # type: ignore[no-untyped-def]
        if manage_engine and not engine.running:
            await asyncio.to_thread(engine.start)
        try:
            yield
        finally:
            if manage_engine:
                await asyncio.to_thread(engine.stop, True)
            pool.shutdown(wait=False, cancel_futures=True)

    async def not_served(request: Request) -> Response:  # the health paths are answered by Front
        return _error("not found", 404)

    m = "/v2/models/{name}"
    mv = "/v2/models/{name}/versions/{version}"
    routes = [
        Route("/v2", server_meta),
        Route(HEALTH_LIVE, not_served), Route(HEALTH_READY, not_served),
        Route(m, metadata), Route(mv, metadata),
        Route(m + "/ready", model_ready), Route(mv + "/ready", model_ready),
        Route(m + "/infer", infer, methods=["POST"]), Route(mv + "/infer", infer, methods=["POST"]),
        Route(m + "/earlyexit", earlyexit),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/v2/repository/models/{name}/load", load, methods=["POST"]),
        Route("/metrics", prom),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: internal_error})
    return Front(app, engine, limits)
