"""Connection limits keep the server reachable: idle and half-sent connections are closed, the
cap evicts idle connections before it refuses, refusals are the protocol's JSON, health is exempt.

The limits are lowered (8 connections, timeouts under a second) so the test machine can bear it.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import httpx
import pytest

from .conftest import image_request, served_cnn, wait_for


@contextlib.contextmanager
def limited(tiny_cnn, **limits):
    from apparate.core.controller import Config
    from apparate.serve.app import create_app
    from apparate.serve.connections import ConnectionLimits
    from apparate.serve.control import ControlOptions
    from apparate.serve.engine import Engine, EngineOptions
    from apparate.serve.scheduler import BatchingOptions
    from apparate.serve.server import ServerThread

    served = served_cnn(tiny_cnn)
    engine = Engine(served, EngineOptions(batching=BatchingOptions(max_batch=1), slo_ms=60_000, threads=1),
                    ControlOptions(policy="static", initial=Config((0,), (0.0,))))
    app = create_app(engine, limits=ConnectionLimits(**limits))
    srv = ServerThread(app).start()
    try:
        yield srv, engine, served
    finally:
        srv.stop()
        engine.executor.close()
        served.ee.remove_hooks()


def _open(port: int, send: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    if send:
        s.sendall(send)
    return s


def _closed_by_server(s: socket.socket, timeout: float) -> bytes | None:
    """What the server sent before closing the connection, or None if it is still open."""
    s.settimeout(timeout)
    got = b""
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                return got
            got += chunk
    except (socket.timeout, TimeoutError):
        return None
    except ConnectionResetError:
        return got


def test_silent_and_half_sent_connections_are_closed(tiny_cnn):
    with limited(tiny_cnn, max_connections=64, header_timeout_s=0.4, idle_timeout_s=0.4) as (srv, engine, _):
        silent = [_open(srv.port) for _ in range(10)]
        half = [_open(srv.port, b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-") for _ in range(5)]
        with httpx.Client(base_url=srv.url) as c:  # a keep-alive connection, idle after its answer
            assert c.post("/v2/models/tiny/infer", json=image_request(1)).status_code == 200
            for s in silent:
                assert _closed_by_server(s, 3.0) == b""  # closed without a word
            for s in half:
                reply = _closed_by_server(s, 3.0)
                assert reply is not None and reply.startswith(b"HTTP/1.1 408 ")
                assert json.loads(reply.split(b"\r\n\r\n", 1)[1]) == {"error": "request head not received in time"}
            time.sleep(0.8)  # past the idle timeout: the client reconnects transparently
            assert c.post("/v2/models/tiny/infer", json=image_request(1)).status_code == 200
            text = c.get("/metrics").text
        assert 'apparate_connections_closed_total{reason="header timeout"} 15.0' in text
        assert 'apparate_connections_closed_total{reason="idle"}' in text
        assert 'apparate_http_requests_total{code="408",route="other"} 5.0' in text


def test_idle_connections_cannot_lock_anyone_out(tiny_cnn):
    """20 idle connections on a server capped at 8: newcomers evict the longest idle."""
    with limited(tiny_cnn, max_connections=8, header_timeout_s=30, idle_timeout_s=30) as (srv, engine, _):
        idle = [_open(srv.port) for _ in range(20)]
        time.sleep(0.2)
        with httpx.Client(base_url=srv.url) as c:
            assert c.get("/v2/health/live").json() == {"live": True}
            r = c.post("/v2/models/tiny/infer", json=image_request(1))
            assert r.status_code == 200, r.text
            text = c.get("/metrics").text
        time.sleep(0.2)
        closed = [s for s in idle if _closed_by_server(s, 0.02) is not None]
        assert len(closed) >= 20 - 8 + 1  # the newcomers' room came from the idle ones
        assert 'apparate_connections_closed_total{reason="evicted"}' in text
        assert "apparate_open_connections" in text


def test_over_the_cap_with_every_connection_busy_refuses_in_json_but_answers_health(tiny_cnn):
    with limited(tiny_cnn, max_connections=4, header_timeout_s=30, idle_timeout_s=30) as (srv, engine, served):
        served.ee.backbone.slow.delay = 0.5  # batches of 1, each 0.5 s: 4 requests keep 4 connections busy
        results: list[int] = []

        def busy() -> None:
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                results.append(c.post("/v2/models/tiny/infer", json=image_request(1)).status_code)

        threads = [threading.Thread(target=busy) for _ in range(4)]
        for t in threads:
            t.start()
        assert wait_for(lambda: engine.running_batch > 0 and len(engine.queue) >= 2)
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            r = c.post("/v2/models/tiny/infer", json=image_request(1))
            assert r.status_code == 503 and r.json() == {"error": "too many connections"}
            assert r.headers["connection"] == "close" and r.headers["content-type"] == "application/json"
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            h = c.get("/v2/health/live")
            assert h.status_code == 200 and h.json() == {"live": True}
            assert c.get("/v2/health/ready").status_code == 200
        served.ee.backbone.slow.delay = 0.0
        for t in threads:
            t.join()
        assert results == [200] * 4
        with httpx.Client(base_url=srv.url) as c:
            assert c.post("/v2/models/tiny/infer", json=image_request(1)).status_code == 200
            text = c.get("/metrics").text
        assert 'apparate_http_requests_total{code="503",route="infer"} 1.0' in text
        assert 'apparate_connections_closed_total{reason="over cap"} 1.0' in text


def test_a_body_that_never_arrives_gets_408(tiny_cnn):
    with limited(tiny_cnn, body_timeout_s=0.3) as (srv, engine, _):
        s = _open(srv.port, b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 1000\r\n\r\n{\"inputs\":")
        reply = _closed_by_server(s, 5.0)
        assert reply is not None and reply.startswith(b"HTTP/1.1 408 ")
        assert b"request body not received within 0.3 s" in reply


@pytest.mark.parametrize("bad", [dict(max_connections=0), dict(header_timeout_s=0), dict(idle_timeout_s=-1)])
def test_limits_are_checked(bad):
    from apparate.serve.connections import ConnectionLimits

    with pytest.raises(ValueError):
        ConnectionLimits(**bad)
