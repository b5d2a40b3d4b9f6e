"""Connection limits that keep the server reachable: timeouts, a cap answered in JSON, health exempt.

uvicorn alone closes a keep-alive connection 5 s after its last response, but a connection
that never sends a byte, or sends half a request head, stays open for ever; and beyond its
`limit_concurrency` it answers every request, health checks included, with a plain-text 503.
About 1,300 idle connections therefore locked every client out. `protocol_class` returns
uvicorn's httptools protocol with:

* a header timeout: a request's head (request line and headers) must be complete within
  `header_timeout_s` of the connection opening or of the request's first byte; otherwise the
  connection is closed (with a JSON 408 if part of a request had arrived);
* an idle timeout (`idle_timeout_s`, uvicorn's keep-alive timeout, also re-armed in the one case
  uvicorn leaves a connection without a timer: a response sent before its request body ended);
* a connection cap that evicts before it refuses: past `max_connections`, the connection idle
  longest (no request being handled: between requests, or still sending a head) is closed,
  which HTTP allows at any time. Only if every connection has a request in progress is the new
  one refused, with the protocol's JSON error (`503 {"error": "too many connections"}`) and
  `connection: close`;
* health (`/v2/health/live`, `/v2/health/ready`) is exempt from the refusal: a health check on
  a connection over the cap is answered like any other.

The request body's own deadline (`body_timeout_s`) is applied by the app, which reads it.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

HEALTH_LIVE = "/v2/health/live"
HEALTH_READY = "/v2/health/ready"
HEALTH = frozenset({HEALTH_LIVE, HEALTH_READY})


def route_of(path: str) -> str:
    """A low-cardinality label for a path (metrics): infer, health, model, repository, metrics, server, other."""
    if path.startswith("/v2/models/"):
        return "infer" if path.endswith("/infer") else "model"
    if path.startswith("/v2/health/"):
        return "health"
    if path == "/metrics":
        return "metrics"
    if path.startswith("/v2/repository/"):
        return "repository"
    if path == "/v2":
        return "server"
    return "other"


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 1024  # open connections; beyond, the longest idle is closed, else 503
    idle_timeout_s: float = 5.0  # a keep-alive connection is closed this long after its last response
    header_timeout_s: float = 10.0  # a request head must arrive within this
    body_timeout_s: float = 30.0  # a request body must arrive within this of its head

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {self.max_connections}")
        for name in ("idle_timeout_s", "header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def _response(status: int, reason: bytes, error: str) -> bytes:
    body = ('{"error":"%s"}' % error).encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, reason, len(body))) + body


HEAD_TIMEOUT = _response(408, b"Request Timeout", "request head not received in time")
TOO_MANY = b'{"error":"too many connections"}'


def protocol_class(limits: ConnectionLimits, front: Any = None) -> type:
    """uvicorn's httptools protocol with the limits above, for one server. `front` (app.Front)
    supplies the metrics; None for none."""
    import httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    metrics = getattr(front, "metrics", None)
    live: set[Any] = set()  # connections open and not being closed by us
    idle: OrderedDict[Any, None] = OrderedDict()  # no request in progress, longest idle first
    if metrics is not None:
        metrics.connections.set_function(lambda: len(live))

    def closed(reason: str) -> None:
        if metrics is not None:
            metrics.closed.labels(reason).inc()

    def count(status: int, route: str) -> None:
        if front is not None:
            front.count(status, route)

    async def too_many(scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(TOO_MANY)).encode()),
                                (b"connection", b"close"), (b"retry-after", b"1")]})
        await send({"type": "http.response.body", "body": TOO_MANY})
        closed("over cap")
        count(503, route_of(scope.get("path", "")))

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None
        _partial = False  # bytes of a request head have arrived

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            live.add(self)
            idle[self] = None
            self._arm_head()
            if len(live) > limits.max_connections:
                self._evict()

        def connection_lost(self, exc: Exception | None) -> None:
            live.discard(self)
            idle.pop(self, None)
            self._cancel_head()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if (self._head_timer is None and self.timeout_keep_alive_task is None and not self._busy()
                    and not self.transport.is_closing()):
                # e.g. the rest of a body whose response was already sent: uvicorn cancelled the
                # keep-alive timer on these bytes and arms none after them.
                self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                    self.timeout_keep_alive_handler)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._partial = True
            if self._head_timer is None:
                self._arm_head()

        def on_headers_complete(self) -> None:
            self._cancel_head()
            self._partial = False
            idle.pop(self, None)
            if len(live) > limits.max_connections:
                self._evict()
            if len(live) > limits.max_connections:
                try:
                    path = httptools.parse_url(self.url).path.decode("ascii", "replace")
                except httptools.HttpParserInvalidURLError:
                    path = ""
                if path not in HEALTH:
                    app, self.app = self.app, too_many
                    try:
                        super().on_headers_complete()
                    finally:
                        self.app = app
                    return
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and not self._busy():
                idle[self] = None
                idle.move_to_end(self)

        def timeout_keep_alive_handler(self) -> None:
            if not self.transport.is_closing():
                closed("idle")
            super().timeout_keep_alive_handler()

        # ---------------------------------------------------------------------------- helpers
        def _busy(self) -> bool:
            return bool(self.pipeline) or (self.cycle is not None and not self.cycle.response_complete)

        def _arm_head(self) -> None:
            self._head_timer = self.loop.call_later(limits.header_timeout_s, self._head_timeout)

        def _cancel_head(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or self._busy():
                return
            if self._partial:
                self.transport.write(HEAD_TIMEOUT)
                count(408, "other")
            closed("header timeout")
            self._close()

        def _close(self) -> None:
            live.discard(self)
            idle.pop(self, None)
            self._cancel_head()
            self._unset_keepalive_if_required()
            self.transport.close()

        def _evict(self) -> None:
            """Close the longest-idle connections (never this one) until within the cap."""
            while len(live) > limits.max_connections:
                victim = next((c for c in idle if c is not self), None)
                if victim is None:
                    return
                closed("evicted")
                victim._close()

    return LimitedHttpToolsProtocol
