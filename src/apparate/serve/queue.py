"""The bounded admission queue.

HTTP handlers put requests in (all inputs of one HTTP request atomically, or none); the engine
thread is the only consumer. Because only the consumer removes entries, indices of a snapshot
stay valid until the consumer itself changes the queue: new arrivals only append. That is what
lets the engine ask a batcher about a snapshot without holding the lock while it decides.

The limit bounds memory: a full queue refuses new requests (HTTP 503) instead of growing.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .requests import Request

QUEUE_FULL = "queue full"
CLOSED = "shutting down"


class Refused(Exception):
    """The queue would not take a request; `reason` is QUEUE_FULL or CLOSED."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class RequestQueue:
    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"queue limit must be at least 1, got {limit}")
        self.limit = limit
        self._items: deque[Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._version = 0  # bumped on every put, close and wake: waiters compare against it

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def put_all(self, reqs: Sequence[Request], check: Callable[[Any], str | None] | None = None) -> None:
        """Admit every request or none (raises Refused). `check(queued)` sees the queue as it is
        under the lock (oldest first) and returns a reason to refuse, or None."""
        with self._cond:
            if self._closed:
                raise Refused(CLOSED)
            if len(self._items) + len(reqs) > self.limit:
                raise Refused(QUEUE_FULL)
            if check is not None:
                why = check(self._items)
                if why is not None:
                    raise Refused(why)
            self._items.extend(reqs)
            self._version += 1
            self._cond.notify()

    def close(self) -> None:
        """Refuse new requests from now on; what is queued stays to be served."""
        with self._cond:
            self._closed = True
            self._version += 1
            self._cond.notify_all()

    @property
    def version(self) -> int:
        return self._version

    def wake(self) -> None:
        """Wake a waiting engine thread without putting anything (it has other work: a swap)."""
        with self._cond:
            self._version += 1
            self._cond.notify_all()

    def wait_change(self, version: int, timeout: float | None) -> None:
        """Block until something was put or the queue closed since `version` was read, or
        `timeout` seconds pass. Reading the version before the snapshot means no put is missed."""
        with self._cond:
            if self._version == version:
                self._cond.wait(timeout)

    def snapshot(self) -> tuple[list[Request], np.ndarray, np.ndarray, np.ndarray]:
        """(requests, arrivals, deadlines, costs), oldest first, as of now."""
        with self._cond:
            items = list(self._items)
        n = len(items)
        arr = np.fromiter((r.arrival for r in items), dtype=np.float64, count=n)
        dl = np.fromiter((r.deadline for r in items), dtype=np.float64, count=n)
        cost = np.fromiter((r.cost for r in items), dtype=np.int64, count=n)
        return items, arr, dl, cost

    def remove(self, drop: Iterable[int], take: int) -> tuple[list[Request], list[Request]]:
        """Remove the snapshot indices `drop`, then the `take` oldest of what remains.

        Returns (dropped, taken). Valid for indices of a snapshot taken since the last removal.
        """
        gone = sorted(set(int(i) for i in drop))
        with self._cond:
            dropped: list[Request] = []
            if gone:
                keep: deque[Request] = deque()
                g = 0
                for i, r in enumerate(self._items):
                    if g < len(gone) and gone[g] == i:
                        dropped.append(r)
                        g += 1
                    else:
                        keep.append(r)
                self._items = keep
            taken = [self._items.popleft() for _ in range(min(take, len(self._items)))]
        return dropped, taken

    def drain_all(self) -> list[Request]:
        with self._cond:
            items = list(self._items)
            self._items.clear()
        return items
