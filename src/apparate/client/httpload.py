"""A cheap HTTP/1.1 load client for overload measurements: open loop and closed loop.

`loadgen` uses aiohttp, which costs about 1.1 ms of CPU per request on this machine. Past a
server's capacity that is the measurement's undoing on a small machine: at 3x the capacity of
a ResNet-20 server (about 1,500 requests/s) aiohttp alone would take 1.6 of the 2 cores the
client and the server share, and the figures would describe the client. This client writes
pre-encoded requests on kept-alive connections (asyncio protocols, uvloop when installed) and
reads back only the status line, Content-Length and body: tens of microseconds per request.

Open loop: request i is sent at `times[i]` whatever the earlier ones are doing; a free
connection is taken from the pool (more are opened when none is free). Latency counts from the
scheduled send time, so client lag counts against the server; `lag_ms` says how much there
was. Closed loop: `concurrency` clients each send the next request as soon as the previous
answer arrives (how capacity is measured: the most answers per second the server gives).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, base: str, path: str) -> "Target":
        from urllib.parse import urlsplit

        u = urlsplit(base)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"need an http://HOST:PORT URL, got {base!r}")
        return cls(u.hostname, u.port or 80, path)


def encode_request(target: Target, body: bytes, headers: dict[str, str]) -> bytes:
    """The whole HTTP/1.1 POST, head and body, ready to write."""
    lines = [f"POST {target.path} HTTP/1.1", f"Host: {target.host}:{target.port}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() not in ("content-length", "host")]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class Shots:
    """Per request: scheduled send (s from the run's start), latency from it (ms), status (0: no
    answer), and the body of every answer that was not a 200 (for the reasons)."""

    sched: np.ndarray
    latency_ms: np.ndarray
    status: np.ndarray
    lag_ms: np.ndarray
    errors: dict[int, bytes] = field(default_factory=dict)
    bodies: dict[int, bytes] = field(default_factory=dict)  # 200 answers, when asked for
    span_s: float = 0.0
    connections: int = 0


class _Conn(asyncio.Protocol):
    def __init__(self, client: "_Client") -> None:
        self.client = client
        self.transport: Any = None
        self.buf = bytearray()
        self.need = -1  # bytes of the current response (head + body); -1 while the head is incomplete
        self.status = 0
        self.close_after = False
        self.index = -1  # request in flight, -1 when idle
        self.closed = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def send(self, index: int, data: bytes) -> None:
        self.index = index
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            if self.need < 0:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buf[:end]).lower()
                self.status = int(head[9:12])
                k = head.find(b"content-length:")
                length = 0
                if k >= 0:
                    e = head.find(b"\r\n", k)
                    length = int(head[k + 15:e if e >= 0 else len(head)])
                self.close_after = b"connection: close" in head
                self.head_len = end + 4
                self.need = end + 4 + length
            if len(buf) < self.need:
                return
            body = bytes(buf[self.head_len:self.need])
            del buf[: self.need]
            self.need = -1
            i, self.index = self.index, -1
            if i >= 0:
                self.client.done(self, i, self.status, body)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        i, self.index = self.index, -1
        if i >= 0:
            self.client.done(self, i, 0, b"connection lost")
        self.client.lost(self)


class _Client:
    def __init__(self, target: Target, requests: Sequence[bytes], n: int, t0: float) -> None:
        self.target = target
        self.requests = requests
        self.t0 = t0
        self.idle: list[_Conn] = []
        self.opened = 0
        self.sched = np.zeros(n)
        self.sent = np.zeros(n)
        self.done_at = np.full(n, np.nan)
        self.status = np.zeros(n, dtype=np.int64)
        self.errors: dict[int, bytes] = {}
        self.remaining = n
        self.finished = asyncio.get_running_loop().create_future()
        self.waiting: list[int] = []  # requests due while no connection was free
        self.on_done: Any = None  # closed loop: called with the connection freed
        self.keep: dict[int, bytes] | None = None  # 200 bodies, if kept

    async def open(self, k: int) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(k):
            _, conn = await loop.create_connection(lambda: _Conn(self), self.target.host, self.target.port)
            self.opened += 1
            self.idle.append(conn)

    def start(self, i: int, conn: _Conn | None = None) -> None:
        self.sent[i] = time.perf_counter() - self.t0
        if conn is None:
            while self.idle and self.idle[-1].closed:
                self.idle.pop()
            if not self.idle:
                self.waiting.append(i)
                asyncio.get_running_loop().create_task(self._grow())
                return
            conn = self.idle.pop()
        conn.send(i, self.requests[i % len(self.requests)])

    async def _grow(self) -> None:
        await self.open(1)
        if self.waiting:
            self.start(self.waiting.pop(0), self.idle.pop())

    def done(self, conn: _Conn, i: int, status: int, body: bytes) -> None:
        self.done_at[i] = time.perf_counter() - self.t0
        self.status[i] = status
        if status != 200:
            self.errors[i] = body[:200]
        elif self.keep is not None:
            self.keep[i] = body
        self.remaining -= 1
        if not conn.closed and not conn.close_after:
            if self.on_done is not None:
                self.on_done(conn)
            elif self.waiting:
                self.start(self.waiting.pop(0), conn)
            else:
                self.idle.append(conn)
        elif self.on_done is not None:
            self.on_done(None)
        if self.remaining == 0 and not self.finished.done():
            self.finished.set_result(None)

    def lost(self, conn: _Conn) -> None:
        pass

    def close(self) -> None:
        for c in self.idle:
            if c.transport is not None:
                c.transport.close()

    def shots(self, span_s: float) -> Shots:
        lat = (self.done_at - self.sched) * 1e3
        return Shots(self.sched.copy(), lat, self.status.copy(), (self.sent - self.sched) * 1e3, dict(self.errors),
                     dict(self.keep or {}), span_s, self.opened)


def _run(coro: Any) -> Any:
    try:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
            return r.run(coro)
    except ImportError:
        return asyncio.run(coro)


def open_loop(base: str, path: str, times: np.ndarray, requests: Sequence[tuple[bytes, dict[str, str]]],
              connections: int = 128, grace_s: float = 10.0, keep_bodies: bool = False) -> Shots:
    """Send request i % len(requests) at times[i] (s from the start); wait for every answer (at
    most `grace_s` after the last send; unanswered ones get status 0)."""
    target = Target.parse(base, path)
    data = [encode_request(target, b, h) for b, h in requests]
    times = np.asarray(times, dtype=np.float64)

    async def go() -> Shots:
        c = _Client(target, data, len(times), 0.0)
        c.keep = {} if keep_bodies else None
        await c.open(connections)
        c.t0 = time.perf_counter() + 0.02
        c.sched[:] = times
        sleep = asyncio.sleep
        for i, t in enumerate(times.tolist()):
            delay = c.t0 + t - time.perf_counter()
            if delay > 0.0005:  # finer sleeps only cost CPU: a send up to 0.5 ms early or late is lag
                await sleep(delay)
            c.start(i)
        try:
            await asyncio.wait_for(asyncio.shield(c.finished), grace_s)
        except asyncio.TimeoutError:
            pass
        span = float(times[-1]) if len(times) else 0.0
        c.close()
        return c.shots(span)

    return _run(go())


def closed_loop(base: str, path: str, requests: Sequence[tuple[bytes, dict[str, str]]], concurrency: int,
                duration_s: float) -> Shots:
    """`concurrency` clients, each sending its next request when its previous answer arrives,
    for `duration_s` seconds (requests still in flight then are waited for, not counted)."""
    target = Target.parse(base, path)
    data = [encode_request(target, b, h) for b, h in requests]
    cap = int(max(concurrency * duration_s * 5000, 1000))  # far more slots than can be used

    async def go() -> Shots:
        c = _Client(target, data, cap, 0.0)
        await c.open(concurrency)
        c.t0 = time.perf_counter()
        end = duration_s
        nxt = [0]

        def fire(conn: _Conn | None) -> None:
            now = time.perf_counter() - c.t0
            if now >= end or nxt[0] >= cap:
                if conn is not None:
                    c.idle.append(conn)
                return
            i = nxt[0]
            nxt[0] += 1
            c.sched[i] = now
            c.start(i, conn)

        c.on_done = fire
        conns, c.idle = c.idle, []
        for conn in conns:
            fire(conn)
        await asyncio.sleep(duration_s)
        give_up = time.perf_counter() + 10.0
        while c.remaining > cap - nxt[0] and time.perf_counter() < give_up:  # answers still due
            await asyncio.sleep(0.01)
        n = nxt[0]
        c.close()
        s = c.shots(duration_s)
        keep = slice(0, n)
        return Shots(s.sched[keep], s.latency_ms[keep], s.status[keep], s.lag_ms[keep],
                     {k: v for k, v in s.errors.items() if k < n}, {}, duration_s, s.connections)

    return _run(go())
