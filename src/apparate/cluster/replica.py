"""The Serve deployment: every replica runs our engine on the bundle, behind the same HTTP API.

Each replica is `apparate serve` in a Ray actor: `Engine` (queue, batcher, early release,
executor, control thread) and the app of `serve.app.create_app`, which Serve's HTTP proxy
reaches through `@serve.ingress` (the app is built in the replica, after the engine: Serve's
late-bound ingress, `__serve_build_asgi_app__`). Clients see the Open Inference Protocol v2 API
and `/earlyexit` exactly as from one server; two routes say more in a cluster:

* `GET /v2/models/{name}/earlyexit` adds `cluster`: this replica's id, the Config number it
  holds, whether the tuner answers it (and since when not), its feedback counts, and the
  tuner's own state (`tuner_state`; null when it does not answer within a second);
* `GET /metrics` answers the tuner's registry: the tuner's series and every replica's latest
  series labelled `replica` (see `cluster/metrics.py`); when the tuner does not answer, this
  replica's own series, labelled the same way. `GET /metrics?scope=replica` always gives those.

The replica's policy is a `RemotePolicy`: it starts from the tuner's current Config (registered
before the engine is built, so a replacement for a killed replica starts where the cluster is),
and its feedback goes to the tuner through a `TunerLink`. No checkpoint is written by replicas;
the tuner owns the state.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

from ray import serve

from apparate.core.controller import Config

from . import NAMESPACE, TUNER_NAME
from .link import TunerLink
from .metrics import ReplicaFamilies, families
from .remote import RemotePolicy

log = logging.getLogger("apparate.cluster")


@dataclass(frozen=True)
class ReplicaSpec:
    """How a replica builds its engine: `parts()` returns (ServedModel, EngineOptions,
    ControlOptions), e.g. `functools.partial(serve.server.engine_parts, ServeOptions(...))`."""

    parts: Callable[[], tuple[Any, Any, Any]]
    max_body_bytes: int = 16 << 20
    limits: Any = None  # serve.connections.ConnectionLimits
    tuner_name: str = TUNER_NAME
    namespace: str = NAMESPACE
    heartbeat_s: float = 1.0
    register_timeout_s: float = 60.0


@serve.ingress()
class Replica:
    def __init__(self, spec: ReplicaSpec):
        from apparate.serve.engine import Engine

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.spec = spec
        self.id = serve.get_replica_context().replica_id.unique_id
        self.link = TunerLink(self.id, spec.tuner_name, spec.namespace, heartbeat_s=spec.heartbeat_s)
        cur = self._first_registration()
        served, eo, co = spec.parts()
        policy = RemotePolicy(Config.from_dict(cur["config"]), int(cur["seq"]), self.link.send,
                              adaptive=bool(cur.get("adaptive", True)))
        # feedback travels to the tuner over Ray: pooled to a max batch, fewer messages
        self.engine = Engine(served, eo, replace(co, remote=policy, state_dir=None,
                                                 feedback_min_inputs=eo.batching.max_batch))
        policy.on_change = self.engine.control.nudge
        self.link.start(policy, self.engine.control, self.engine.metrics.registry)
        log.info("replica %s: serving %s from the tuner's Config %d %s", self.id, served.name, policy.seq,
                 list(policy.config.sites))

    def _first_registration(self) -> dict[str, Any]:
        end = time.monotonic() + self.spec.register_timeout_s
        while True:
            try:
                return self.link.register()
            except Exception:  # noqa: BLE001
                if time.monotonic() > end:
                    raise RuntimeError(f"the tuner {self.spec.tuner_name!r} did not answer within "
                                       f"{self.spec.register_timeout_s:.0f} s: {self.link.error}") from None
                time.sleep(0.5)

    def __serve_build_asgi_app__(self) -> Any:
        from apparate.serve.app import create_app

        front = create_app(self.engine, self.spec.max_body_bytes, manage_engine=True, limits=self.spec.limits)
        return ClusterFront(front, self)

    async def check_health(self) -> None:
        if self.engine.ready and not self.engine.running:
            raise RuntimeError("the engine thread has stopped")

    def __del__(self) -> None:
        self.link.stop()

    async def tuner_call(self, method: str, timeout_s: float = 1.0) -> Any:
        """A tuner method's answer, or None if it does not answer in time (never raises)."""
        try:
            ref = getattr(self.link._tuner(), method).remote()
            return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout_s)
        except Exception:  # noqa: BLE001 - unreachable: the caller says so
            return None

    def own_metrics(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest

        reg = CollectorRegistry()
        mine = ReplicaFamilies()
        mine.latest[self.id] = families(self.engine.metrics.registry)
        reg.register(mine)
        return generate_latest(reg)


class ClusterFront:
    """ASGI: the cluster's /earlyexit and /metrics, everything else to the replica's app."""

    def __init__(self, front: Any, replica: Replica):
        self.front, self.replica = front, replica
        self.earlyexit = f"/v2/models/{replica.engine.served.name}/earlyexit"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        from apparate.serve.app import send_json

        if scope["type"] != "http" or scope["method"] != "GET" or scope["path"] not in (self.earlyexit, "/metrics"):
            return await self.front(scope, receive, send)
        r = self.replica
        if scope["path"] == "/metrics":
            text = None if b"scope=replica" in scope.get("query_string", b"") else await r.tuner_call("metrics_text")
            body = text if text is not None else r.own_metrics()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            self.front.count(200, "metrics")
            return
        state = r.engine.describe()
        state["cluster"] = {**r.link.state(), "tuner_state": await r.tuner_call("state")}
        await send_json(send, 200, json.dumps(state, separators=(",", ":"), default=str).encode())
        self.front.count(200, "model")
