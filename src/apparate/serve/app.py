"""The HTTP API (Starlette): Open Inference Protocol v2 plus early-exit state and metrics.

    GET  /v2                                    server metadata
    GET  /v2/health/live                        200 while the process serves HTTP
    GET  /v2/health/ready                       200 once the engine is warm and running, else 503
    GET  /v2/models/{name}[/versions/1]         model metadata (inputs, outputs, parameters)
    GET  /v2/models/{name}[/versions/1]/ready   model readiness
    POST /v2/models/{name}[/versions/1]/infer   inference (see protocol.py)
    GET  /v2/models/{name}/earlyexit            live state: ramps, thresholds, accuracy, exit rates
    GET  /metrics                               Prometheus text format

Errors are JSON `{"error": "..."}`: 400 malformed JSON or a bad input tensor, 404 unknown model
or path, 405 wrong method, 413 body over the size limit, 503 overload (queue full, or the
request can no longer meet its SLO) or shutting down, 500 an internal or model error. A bad
request never reaches the engine, so nothing else is disturbed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .engine import Engine
from .model_io import InputError
from .protocol import HEADER_LENGTH, attach_binary, infer_response, model_metadata, parse_infer, split_binary
from .types import Rejected

log = logging.getLogger("apparate.serve")


class TooLarge(Exception):
    pass


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status_code=status, media_type="application/json")


def _error(msg: str, status: int) -> Response:
    return _json({"error": msg}, status)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise TooLarge
        except ValueError:
            pass
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(engine: Engine, max_body_bytes: int = 16 << 20, manage_engine: bool = True) -> Starlette:
    """The ASGI app over an engine. With `manage_engine` the app's lifespan starts the engine
    (if it is not running) and stops it at shutdown, after uvicorn has finished the requests in
    flight, draining whatever is still queued."""
    served = engine.served
    metrics = engine.metrics
    policy = engine.control.options.policy

    def check_model(request: Request) -> None:
        name = request.path_params["name"]
        version = request.path_params.get("version")
        if name != served.name or (version is not None and version != "1"):
            what = f"model {name!r}" + (f" version {version!r}" if version is not None else "")
            raise HTTPException(404, f"unknown {what}; this server serves {served.name!r} (version 1)")

    async def server_meta(request: Request) -> Response:
        from apparate import __version__

        return _json({"name": "apparate", "version": __version__, "extensions": ["earlyexit", "binary_tensor_data"]})

    async def live(request: Request) -> Response:
        return _json({"live": True})

    def is_ready() -> bool:
        return bool(engine.ready and engine.running)

    async def ready(request: Request) -> Response:
        ok = is_ready()
        return _json({"ready": ok}, 200 if ok else 503)

    async def model_ready(request: Request) -> Response:
        check_model(request)
        ok = is_ready()
        return _json({"name": served.name, "ready": ok}, 200 if ok else 503)

    async def metadata(request: Request) -> Response:
        check_model(request)
        return _json(model_metadata(served, policy))

    async def earlyexit(request: Request) -> Response:
        check_model(request)
        return _json(engine.describe())

    async def prom(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def infer(request: Request) -> Response:
        resp = await _infer(request)
        metrics.http.labels(str(resp.status_code)).inc()
        return resp

    async def _infer(request: Request) -> Response:
        try:
            check_model(request)
        except HTTPException as e:
            return _error(str(e.detail), e.status_code)
        if len(engine.queue) >= engine.queue.limit:  # full: refuse before reading or parsing anything
            engine.metrics.drop("queue full")
            return _error("queue full", 503)
        try:
            body = await _read_body(request, max_body_bytes)
        except TooLarge:
            return _error(f"request body over the limit of {max_body_bytes} bytes", 413)
        try:
            head, raw = split_binary(body, request.headers.get(HEADER_LENGTH))
            try:
                payload = json.loads(head)
            except (ValueError, UnicodeDecodeError) as e:
                return _error(f"malformed JSON: {e}", 400)
            attach_binary(payload, raw)
            req = parse_infer(payload, served.codec, served.class_names)
        except InputError as e:
            return _error(str(e), 400)
        results = await engine.infer(req.items, req.costs)
        bad = [r for r in results if isinstance(r, Rejected)]
        if bad:  # one input refused or failed: the request is (the answers of the others are dropped)
            worst = max(bad, key=lambda r: r.status)
            return _error(worst.reason, worst.status)
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

    m = "/v2/models/{name}"
    mv = "/v2/models/{name}/versions/{version}"
    routes = [
        Route("/v2", server_meta),
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route(m, metadata), Route(mv, metadata),
        Route(m + "/ready", model_ready), Route(mv + "/ready", model_ready),
        Route(m + "/infer", infer, methods=["POST"]), Route(mv + "/infer", infer, methods=["POST"]),
        Route(m + "/earlyexit", earlyexit),
        Route("/metrics", prom),
    ]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: http_error, Exception: internal_error})
