"""The tuner as a Ray actor: one named, restartable actor per cluster deployment.

An async actor: its methods run one at a time on its event loop (so `TunerCore` needs no lock),
and `wait_config` is a long-poll, Serve's own way of pushing its configuration to replicas: each
replica keeps one call waiting; a new Config number wakes them all at once (a broadcast), and a
replica that was away gets the current Config on its next call. The tuner never calls a replica,
so a slow or dead replica cannot hold it up.

Ray restarts the actor when its process dies (`max_restarts=-1`), running `__init__` again with
the same spec: the control loop restores the last checkpoint from the state directory, and the
new incarnation id tells replicas to register again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

import ray

from . import NAMESPACE, TUNER_NAME
from .tuner_core import TunerCore, TunerSpec

log = logging.getLogger("apparate.cluster")


class Tuner:
    def __init__(self, spec: TunerSpec | Callable[[], TunerSpec]):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.core = TunerCore(spec if isinstance(spec, TunerSpec) else spec())
        self._changed: asyncio.Event | None = None
        self._ticker: asyncio.Task | None = None
        log.info("tuner %s up: Config %d, restored %s", self.core.incarnation, self.core.seq, self.core.loop.restored)

    def _wake(self, before: int) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        if self._ticker is None and self.core.spec.control.state_dir is not None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick())
        if self.core.seq != before:
            self._changed.set()
            self._changed = asyncio.Event()

    async def _tick(self) -> None:
        """Checkpoint on schedule even when no feedback comes."""
        while True:
            await asyncio.sleep(min(self.core.spec.control.checkpoint_every_s, 5.0))
            self.core.maybe_checkpoint()

    async def register(self, replica: str, applied: int = 0) -> dict[str, Any]:
        before = self.core.seq
        out = self.core.register(replica, applied)
        self._wake(before)
        return out

    async def feedback(self, replica: str, msg: dict[str, Any]) -> dict[str, Any]:
        before = self.core.seq
        out = self.core.feedback(replica, msg)
        self._wake(before)
        return out

    async def wait_config(self, after: int, timeout_s: float = 10.0) -> dict[str, Any]:
        """The current Config as soon as its number is above `after`, or after `timeout_s`."""
        self._wake(self.core.seq)
        end = time.monotonic() + timeout_s
        while self.core.seq <= after and time.monotonic() < end:
            event = self._changed
            assert event is not None
            try:
                await asyncio.wait_for(event.wait(), max(end - time.monotonic(), 0.0))
            except TimeoutError:
                break
        return self.core.current()

    async def state(self) -> dict[str, Any]:
        return self.core.state()

    async def metrics_text(self) -> bytes:
        return self.core.metrics.text()

    async def checkpoint(self) -> dict[str, Any]:
        """Checkpoint now; the path written (None without a state directory) and the state saved."""
        return {"path": self.core.checkpoint(), **self.core.state()}


def tuner_actor(spec: TunerSpec | Callable[[], TunerSpec], name: str = TUNER_NAME, namespace: str = NAMESPACE,
                detached: bool = False) -> Any:
    """Start the named tuner (or return the one running under that name). Not detached, it lives
    as long as the driver that started it (`apparate serve --ray`); detached, until killed. Give
    `spec` as a function that builds it (`partial(TunerSpec.from_bundle, ...)`): a small argument
    travels inside the actor's creation task, where Ray finds it for every restart, whereas a spec
    holding the recording would sit in the object store, where it may not outlive its owner."""
    cls = ray.remote(Tuner)
    return cls.options(name=name, namespace=namespace, lifetime="detached" if detached else None,
                       get_if_exists=True, max_restarts=-1, max_task_retries=0, num_cpus=0,
                       max_concurrency=1000).remote(spec)


def get_tuner(name: str = TUNER_NAME, namespace: str = NAMESPACE) -> Any:
    return ray.get_actor(name, namespace=namespace)
