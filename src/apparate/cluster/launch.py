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
from typing import Any, Callable

import ray
from ray import serve

from .options import ClusterOptions, absolute_paths
from .replica import Replica, ReplicaSpec
from .tuner import tuner_actor
from .tuner_core import TunerSpec

log = logging.getLogger("apparate.cluster")


@dataclass
class Cluster:
    url: str
    tuner: Any
    options: ClusterOptions
    model: str

    def model_url(self, suffix: str = "") -> str:
        return f"{self.url}/v2/models/{self.model}{suffix}"


def deploy(tuner_spec: TunerSpec | Callable[[], TunerSpec], replica_spec: ReplicaSpec,
           options: ClusterOptions = ClusterOptions(), host: str = "127.0.0.1", port: int = 8000,
           timeout_s: float = 600.0) -> Cluster:
    """Start the tuner and the replicas (on a Ray that is already initialised); ready on return.
    `tuner_spec` is best a function that builds the spec (see `tuner.tuner_actor`)."""
    replica_spec = replace(replica_spec, tuner_name=options.tuner_name, namespace=options.namespace,
                           heartbeat_s=options.heartbeat_s)
    tuner = tuner_actor(tuner_spec, options.tuner_name, options.namespace, options.detached_tuner)
    serve.start(http_options={"host": host, "port": port})  # while the tuner starts
    state = ray.get(tuner.state.remote(), timeout=timeout_s)  # placed and restored before any replica asks
    app = serve.deployment(Replica, **options.deployment_options()).bind(replica_spec)
    serve.run(app, name=options.app_name, route_prefix="/")
    return Cluster(f"http://{host}:{port}", tuner, options, state["model"])


def shutdown(cluster: Cluster) -> None:
    """Remove the application (replicas drain), checkpoint and stop the tuner."""
    serve.delete(cluster.options.app_name)
    try:
        ray.get(cluster.tuner.checkpoint.remote(), timeout=30)
    except Exception:  # noqa: BLE001 - a tuner that is gone has nothing left to save
        pass
    ray.kill(cluster.tuner, no_restart=True)


def start_ray(address: str | None = None, namespace: str = "apparate", **kw: Any) -> None:
    """Start a local Ray (or join one at `address`) for this process."""
    ray.init(address=address, include_dashboard=False, namespace=namespace, **kw)


def stop_ray() -> None:
    serve.shutdown()
    ray.shutdown()


def remove(cluster: Cluster) -> None:
    """Stop Serve (every application) and the tuner at once, no checkpoint: between benchmark runs."""
    serve.shutdown()
    ray.kill(cluster.tuner, no_restart=True)


def run(opts: Any, options: ClusterOptions) -> int:
    """`apparate serve BUNDLE --ray`: serve until interrupted. `opts` is the ServeOptions."""
    from apparate.serve.server import engine_parts

    logging.basicConfig(level=getattr(logging, opts.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    opts = absolute_paths(opts)
    start_ray(options.address, options.namespace)
    threads = opts.threads or max(1, int(options.replica_cpus))
    spec = ReplicaSpec(partial(engine_parts, replace(opts, threads=threads, state_dir=None)), opts.max_body_bytes,
                       opts.limits())
    cluster = deploy(partial(TunerSpec.from_options, opts), spec, options, opts.host, opts.port)
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
        stop_ray()
    return 0
