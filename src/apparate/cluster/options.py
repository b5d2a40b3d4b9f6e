"""How the cluster is deployed (`apparate serve --ray` flags): Serve's deployment options, and the
paths every process must resolve alike."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from . import NAMESPACE, TUNER_NAME


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
                                          "initial_replicas": min(max(self.replicas, self.min_replicas),
                                                                  self.max_replicas),
                                          "target_ongoing_requests": self.target_ongoing_requests}
        else:
            opts["num_replicas"] = self.replicas
        return opts


def absolute_paths(opts: Any) -> Any:
    """Replicas and the tuner run in other processes (and, on a cluster, other machines, where
    these paths must exist too): the bundle, data and state directories as absolute paths."""
    from pathlib import Path

    from apparate.paths import data_dir

    found = data_dir(opts.data_dir, required=False)
    return replace(opts, bundle=str(Path(opts.bundle).resolve()), data_dir=None if found is None else str(found),
                   state_dir=None if opts.state_dir is None else str(Path(opts.state_dir).resolve()))
