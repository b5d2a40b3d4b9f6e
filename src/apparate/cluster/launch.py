"""Deploying the cluster on Ray Serve, and `apparate serve BUNDLE --ray`.

`deploy` starts the named tuner, then the Serve application (`Replica` deployment, route
prefix "/") behind Serve's HTTP proxy on `host:port`; `shutdown` removes both. `run` is the
command: it starts a local Ray cluster or joins one (`--address auto` or `ray://HOST:10001`),
deploys, and serves until SIGINT/SIGTERM. Scheduling, placement, replacing dead replicas and
autoscaling are Serve's; nothing here schedules anything.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import ray
from ray import serve

from . import NAMESPACE, TUNER_NAME
from .replica import Replica, ReplicaSpec
from .tuner import tuner_actor
from .tuner_core import TunerSpec

log = logging.getLogger("apparate.cluster")


@dataclass(frozen=True)
class ClusterOptions:
    replicas: int = 2
    replica_cpus: float = 1.0  # Ray CPUs reserved per replica (its torch threads default to this)
    min_replicas: int | None = None  # with max_replicas: Serve autoscales between them
    max_replicas: int | None = None
    target_ongoing_requests: float = 16.0  # autoscaling: requests in flight per replica to aim for
    max_ongoing_requests: int = 1024  # per replica; our engine admits or sheds, Serve's proxy queues beyond
    address: str | None = None  # None: a new local Ray cluster; "auto" or "ray://host:10001": join one
    app_name: str = "apparate"
    tuner_name: str = TUNER_NAME
    namespace: str = NAMESPACE
    detached_tuner: bool = False
    health_check_period_s: float = 2.0
    graceful_shutdown_wait_loop_s: float = 2.0  # how often a stopping replica checks for requests in flight
    heartbeat_s: float = 1.0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {self.replicas}")
        if not self.replica_cpus > 0:
            raise ValueError(f"replica_cpus must be positive, got {self.replica_cpus}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("give both min_replicas and max_replicas for autoscaling, or neither")
        if self.min_replicas is not None and not 0 < self.min_replicas <= self.max_replicas:  # type: ignore[operator]
            raise ValueError(f"need 0 < min_replicas <= max_replicas, got {self.min_replicas}..{self.max_replicas}")

    def deployment_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"name": "Replica", "ray_actor_options": {"num_cpus": self.replica_cpus},
                                "max_ongoing_requests": self.max_ongoing_requests,
                                "health_check_period_s": self.health_check_period_s,
                                "graceful_shutdown_wait_loop_s": self.graceful_shutdown_wait_loop_s}
        if self.min_replicas is not None:
            opts["autoscaling_config"] = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                          "initial_replicas": self.replicas,
                                          "target_ongoing_requests": self.target_ongoing_requests}
        else:
            opts["num_replicas"] = self.replicas
        return opts


@dataclass
class Cluster:
    url: str
    tuner: Any
    options: ClusterOptions
    model: str

    def model_url(self, suffix: str = "") -> str:
        return f"{self.url}/v2/models/{self.model}{suffix}"


def deploy(tuner_spec: TunerSpec, replica_spec: ReplicaSpec, options: ClusterOptions = ClusterOptions(),
           host: str = "127.0.0.1", port: int = 8000, timeout_s: float = 600.0) -> Cluster:
    """Start the tuner and the replicas (on a Ray that is already initialised); ready on return."""
    replica_spec = replace(replica_spec, tuner_name=options.tuner_name, namespace=options.namespace,
                           heartbeat_s=options.heartbeat_s)
    tuner = tuner_actor(tuner_spec, options.tuner_name, options.namespace, options.detached_tuner)
    serve.start(http_options={"host": host, "port": port})  # while the tuner starts
    ray.get(tuner.state.remote(), timeout=timeout_s)  # placed and restored before any replica asks
    app = serve.deployment(Replica, **options.deployment_options()).bind(replica_spec)
    serve.run(app, name=options.app_name, route_prefix="/")
    return Cluster(f"http://{host}:{port}", tuner, options, tuner_spec.model.name)


def shutdown(cluster: Cluster) -> None:
    """Remove the application (replicas drain), checkpoint and stop the tuner."""
    serve.delete(cluster.options.app_name)
    try:
        ray.get(cluster.tuner.checkpoint.remote(), timeout=30)
    except Exception:  # noqa: BLE001 - a tuner that is gone has nothing left to save
        pass
    ray.kill(cluster.tuner, no_restart=True)


def run(opts: Any, options: ClusterOptions) -> int:
    """`apparate serve BUNDLE --ray`: serve until interrupted. `opts` is the ServeOptions."""
    from apparate.serve.server import engine_parts

    logging.basicConfig(level=getattr(logging, opts.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    ray.init(address=options.address, include_dashboard=False, namespace=options.namespace)
    threads = opts.threads or max(1, int(options.replica_cpus))
    spec = ReplicaSpec(partial(engine_parts, replace(opts, threads=threads, state_dir=None)), opts.max_body_bytes,
                       opts.limits())
    cluster = deploy(TunerSpec.from_options(opts), spec, options, opts.host, opts.port)
    log.info("serving %s at %s/v2/models/%s on Ray Serve: %s replicas (%g CPUs, %d torch threads each), one tuner "
             "(ready in %.1f s)", cluster.model, cluster.url, cluster.model,
             options.replicas if options.min_replicas is None else f"{options.min_replicas}..{options.max_replicas}",
             options.replica_cpus, threads, time.perf_counter() - t0)
    if opts.port_file:
        import json
        import os
        from pathlib import Path

        tmp = Path(opts.port_file + ".tmp")
        tmp.write_text(json.dumps({"url": cluster.url, "port": opts.port, "model": cluster.model, "pid": os.getpid()}))
        os.replace(tmp, opts.port_file)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.info("shutting down: replicas drain, the tuner checkpoints")
        shutdown(cluster)
        serve.shutdown()
        ray.shutdown()
    return 0
