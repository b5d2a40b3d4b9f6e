"""The tuner's Prometheus metrics, and every replica's metrics merged under a `replica` label.

Behind Ray Serve's proxy a scrape of `/metrics` reaches one replica at random, so a replica's own
registry alone would show a different replica each time. Each replica therefore sends its metric
families (plain tuples: `families`) to the tuner with its heartbeat; `/metrics` on any replica
answers the tuner's registry, which holds the tuner's own series and, through `ReplicaFamilies`,
every replica's latest series with `replica="<id>"` added, each family once (the text format
requires a family's samples together).
"""

from __future__ import annotations

from typing import Any, Iterator

Families = list[tuple[str, str, str, list[tuple[str, dict[str, str], float]]]]


def families(registry: Any) -> Families:
    """A registry's current samples as plain, picklable tuples."""
    return [(f.name, f.documentation, f.type, [(s.name, dict(s.labels), float(s.value)) for s in f.samples])
            for f in registry.collect()]


class ReplicaFamilies:
    """A prometheus_client collector: the latest families of each replica, labelled by replica."""

    def __init__(self) -> None:
        self.latest: dict[str, Families] = {}

    def forget(self, replica: str) -> None:
        self.latest.pop(replica, None)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.metrics_core import Metric

        merged: dict[str, Any] = {}
        for rid in sorted(self.latest):
            for name, doc, typ, samples in self.latest[rid]:
                m = merged.get(name)
                if m is None:
                    m = merged[name] = Metric(name, doc, typ)
                for sname, labels, value in samples:
                    m.add_sample(sname, {**labels, "replica": rid}, value)
        yield from merged.values()


class TunerMetrics:
    """What the control loop reports (`show_config`, `error`) plus the tuner's own series."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = r = CollectorRegistry()
        self.version = Gauge("apparate_tuner_config_version", "Number of the Config the tuner pushes now", registry=r)
        self.controller_version = Gauge("apparate_tuner_controller_version", "The controller's own Config version",
                                        registry=r)
        self.window_accuracy = Gauge("apparate_tuner_window_accuracy",
                                     "Share of the pooled window's released answers equal to the original model's",
                                     registry=r)
        self.window_inputs = Gauge("apparate_tuner_window_inputs", "Served inputs in the pooled window", registry=r)
        self.active_ramps = Gauge("apparate_tuner_active_ramps", "Active ramps in the Config pushed", registry=r)
        self.threshold = Gauge("apparate_tuner_ramp_threshold", "Threshold of each active ramp", ["site"], registry=r)
        self.replicas = Gauge("apparate_tuner_replicas", "Replicas heard from within the last 30 s", registry=r)
        self.lag = Gauge("apparate_tuner_feedback_lag_seconds",
                         "Latest feedback's age when the tuner handled it (sent -> handled), per replica",
                         ["replica"], registry=r)
        self.inputs = Counter("apparate_tuner_feedback_inputs", "Inputs of feedback received, per replica",
                              ["replica"], registry=r)
        self.registrations = Counter("apparate_tuner_registrations", "Replica (re-)registrations", registry=r)
        self.errors = Counter("apparate_tuner_errors", "Errors, by kind", ["kind"], registry=r)
        self.replica_families = ReplicaFamilies()
        r.register(self.replica_families)
        self._sites: set[str] = set()

    def show_config(self, sites: tuple[int, ...], thresholds: tuple[float, ...], version: int) -> None:
        self.controller_version.set(version)
        self.active_ramps.set(len(sites))
        labels = {str(s) for s in sites}
        for gone in self._sites - labels:
            try:
                self.threshold.remove(gone)
            except KeyError:
                pass
        for s, t in zip(sites, thresholds):
            self.threshold.labels(str(s)).set(t)
        self._sites = labels

    def error(self, kind: str, n: int = 1) -> None:
        self.errors.labels(kind).inc(n)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
