"""Prometheus metrics and the live statistics behind `/earlyexit`.

Each engine owns its own `CollectorRegistry` (several servers can live in one process, as in
the tests). Exits, agreement, latencies and batch sizes are handed over by the control thread once
a batch has ended (when each early answer's agreement with the final one is known) and recorded
in bulk: every `FOLD_EVERY` batches, and whenever the metrics are read (a scrape, `snapshot`), so
what is read is always complete. Recording each batch as it came cost the control thread some
150 us a batch of 8 (18 histogram observations, each a lock and a walk over the buckets, on cold
caches) while the next batch ran; handing it over and folding costs about 30 us a batch.

"Accuracy vs the original" here is measured on what was actually served: the share of released
answers equal to the model's own final answer on the same input (every input still reaches the
end of the model, so this is exact, not estimated). `window` is the last `window` inputs. With
early stop (`--early-stop`) the inputs that left their batch's pass have no final answer: the
agreement counters and the window count only the inputs that reached the end, among which exited
inputs are a sample (the controller weights them back; these plain counts do not), and
`apparate_early_stop_rows_total` / `apparate_early_stop_batches_total` count what left.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                   0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)
FOLD_EVERY = 64  # batches handed over before they are recorded together (a read records them at once)


class BulkHistogram:
    """A Prometheus histogram fed many values at once: bucket counts in numpy, exposed through
    `collect` as prometheus_client's own histograms are (`_bucket`, `_count`, `_sum`)."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...], registry: Any):
        self.name, self.documentation = name, documentation
        self._bounds = np.asarray(buckets, dtype=np.float64)
        self._counts = np.zeros(self._bounds.size + 1, dtype=np.int64)  # last slot: above every bound
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values: Any) -> None:
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        if not v.size:
            return
        counts = np.bincount(np.searchsorted(self._bounds, v, side="left"), minlength=self._counts.size)
        with self._lock:
            self._counts += counts
            self._sum += float(v.sum())

    def describe(self) -> list[Any]:
        from prometheus_client.core import HistogramMetricFamily

        return [HistogramMetricFamily(self.name, self.documentation)]

    def collect(self) -> list[Any]:
        from prometheus_client.core import HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        with self._lock:
            cum, total = np.cumsum(self._counts).tolist(), self._sum
        buckets = [(floatToGoString(b), c) for b, c in zip(self._bounds.tolist(), cum)] + [("+Inf", cum[-1])]
        return [HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=total)]


class _FoldFirst:
    """Registered before every other metric: a read of the registry records the batches handed
    over so far before anything is collected."""

    def __init__(self, fold: Callable[[], None]):
        self._fold = fold

    def collect(self) -> list[Any]:
        self._fold()
        return []


class ServeMetrics:
    def __init__(self, num_sites: int, window: int = 1024):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self._pending: list[tuple[Any, ...]] = []  # batches handed over, not yet recorded
        self._pending_lock = threading.Lock()
        self._fold_lock = threading.Lock()  # folds run one at a time, in order
        r.register(_FoldFirst(self.fold))
        self.latency = BulkHistogram("apparate_request_latency_seconds",
                                     "Server-side latency of each input: arrival to release", LATENCY_BUCKETS, r)
        self.queue_wait = BulkHistogram("apparate_queue_wait_seconds", "Arrival to the start of the input's batch",
                                        LATENCY_BUCKETS, r)
        self.http = Counter("apparate_http_requests_total",
                            "HTTP responses sent, by status and route (infer, health, model, metrics, server, other)",
                            ["code", "route"], registry=r)
        self.connections = Gauge("apparate_open_connections", "HTTP connections open", registry=r)
        self.closed = Counter("apparate_connections_closed_total",
                              "Connections closed by the server, by reason (idle, header timeout, evicted, over cap)",
                              ["reason"], registry=r)
        self.exits = Counter("apparate_exits_total", "Answers released, by exit (site index or final)", ["site"],
                             registry=r)
        self.released = Counter("apparate_released_total",
                                "Answers released, by agreement with the original model's final answer", ["agree"],
                                registry=r)
        self.window_accuracy = Gauge("apparate_window_accuracy",
                                     "Share of the last window's released answers equal to the original model's",
                                     registry=r)
        self.active_ramps = Gauge("apparate_active_ramps", "Number of active ramps", registry=r)
        self.threshold = Gauge("apparate_ramp_threshold", "Threshold of each active ramp", ["site"], registry=r)
        self.config_version = Gauge("apparate_config_version", "Version of the configuration in force", registry=r)
        self.batch_size = BulkHistogram("apparate_batch_size", "Inputs per executed batch", BATCH_BUCKETS, r)
        self.batch_time = BulkHistogram("apparate_batch_seconds", "Batch taken from the queue -> all answers released",
                                        LATENCY_BUCKETS, r)
        self.queue_depth = Gauge("apparate_queue_depth", "Inputs waiting in the queue", registry=r)
        self.gc_pause = Histogram("apparate_gc_pause_seconds", "Garbage collections (`apparate serve` only)",
                                  buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2), registry=r)
        self.slowdown = Gauge("apparate_batch_slowdown",
                              "Wall time / engine CPU time of recent batches (1: no waiting for the GIL or a core)",
                              registry=r)
        self.dropped = Counter("apparate_dropped_total", "Inputs refused or dropped (HTTP 503), by reason", ["reason"],
                               registry=r)
        self.errors = Counter("apparate_errors_total", "Errors, by kind (ramp, model, feedback, http)", ["kind"],
                              registry=r)
        self.stop_rows = Counter("apparate_early_stop_rows_total",
                                 "Released inputs that left their batch's pass while work was waiting (early stop)",
                                 registry=r)
        self.stop_batches = Counter("apparate_early_stop_batches_total",
                                    "Batches stopped before the model's end: every input had left (early stop)",
                                    registry=r)
        self.feedback_dropped = Counter("apparate_feedback_dropped_total",
                                        "Batch reports the controller could not keep up with", registry=r)
        # the objectives, so that dashboards draw goodput and accuracy against them (deploy/grafana)
        self.slo = Gauge("apparate_slo_seconds", "Latency objective of each request", registry=r)
        self.accuracy_constraint = Gauge("apparate_accuracy_constraint",
                                         "Largest share of released answers allowed to differ from the original "
                                         "model's", registry=r)
        self.within_slo = Counter("apparate_within_slo_total", "Answers released within the latency objective "
                                  "(goodput)", registry=r)
        self._slo_s = float("inf")
        # The usual reasons and kinds start at 0, so that a dashboard's rate() has a series to draw
        # before the first one happens (Prometheus's advice for labelled counters).
        for reason in ("overloaded", "late", "predicted late", "queue full", "too large", "shutting down"):
            self.dropped.labels(reason)
        for kind in ("ramp", "model", "engine", "feedback", "http", "checkpoint"):
            self.errors.labels(kind)
        self._site_labels: set[str] = set()
        self.live = LiveStats(num_sites, window)

    def watch_queue(self, depth: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)

    def watch_slowdown(self, value: Callable[[], float]) -> None:
        self.slowdown.set_function(value)

    def show_config(self, sites: tuple[int, ...], thresholds: tuple[float, ...], version: int) -> None:
        self.active_ramps.set(len(sites))
        self.config_version.set(version)
        self._site_labels = show_thresholds(self.threshold, self._site_labels, sites, thresholds)

    def set_objectives(self, slo_s: float, accuracy_constraint: float) -> None:
        self._slo_s = slo_s
        self.slo.set(slo_s)
        self.accuracy_constraint.set(accuracy_constraint)

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped.labels(reason).inc(n)
        self.live.count("dropped", reason, n)

    def early_stop(self, rows: int, stopped: bool) -> None:
        """A batch from which `rows` released inputs left (early stop); `stopped`: all of them."""
        self.stop_rows.inc(rows)
        self.live.count("early_stop", "rows_left", rows)
        if stopped:
            self.stop_batches.inc()
            self.live.count("early_stop", "batches_stopped")

    def error(self, kind: str, n: int = 1) -> None:
        self.errors.labels(kind).inc(n)
        self.live.count("errors", kind, n)

    def batch_done(self, exit_sites: np.ndarray, agree: np.ndarray, latencies_s: Any, waits_s: Any,
                   batch_s: float, known: np.ndarray | None = None) -> None:
        """Hand a batch over (recorded with the next fold): `exit_sites` [B] (-1: the final output),
        `agree` [B] with the final answer, each input's latency and queue wait (s), the batch's
        time. `known`: with early stop, the inputs that reached the final output; agreement (the
        counters and the live window) is counted on those alone, exits on every input."""
        with self._pending_lock:
            self._pending.append((exit_sites, agree, latencies_s, waits_s, batch_s, known))
            full = len(self._pending) >= FOLD_EVERY
        if full:
            self.fold()

    def fold(self) -> None:
        """Record every batch handed over so far, in order, in one pass."""
        with self._fold_lock:
            with self._pending_lock:
                batches, self._pending = self._pending, []
            if not batches:
                return
            lat = np.concatenate([np.asarray(b[2], dtype=np.float64) for b in batches])
            self.latency.observe_many(lat)
            self.queue_wait.observe_many(np.concatenate([np.asarray(b[3], dtype=np.float64) for b in batches]))
            self.batch_size.observe_many([b[0].size for b in batches])
            self.batch_time.observe_many([b[4] for b in batches])
            good = int(np.count_nonzero(lat <= self._slo_s))
            if good:
                self.within_slo.inc(good)
            exits = np.concatenate([b[0] for b in batches])
            counts = np.bincount(exits + 1)  # slot 0: the final output (-1)
            for s in np.flatnonzero(counts).tolist():
                self.exits.labels("final" if s == 0 else str(s - 1)).inc(int(counts[s]))
            agree = np.concatenate([b[1] for b in batches])
            if any(b[5] is not None for b in batches):
                known = np.concatenate([np.ones(b[0].size, dtype=bool) if b[5] is None else b[5] for b in batches])
                exits, agree = exits[known], agree[known]
            good = int(agree.sum())
            if good:
                self.released.labels("true").inc(good)
            if agree.size - good:
                self.released.labels("false").inc(int(agree.size - good))
            self.window_accuracy.set(self.live.record(exits, agree, batches=len(batches)))

    def snapshot(self) -> dict[str, Any]:
        """The live statistics (`LiveStats.snapshot`), every batch handed over included."""
        self.fold()
        return self.live.snapshot()


class LiveStats:
    """Thread-safe counters and a ring buffer of the latest released answers."""

    def __init__(self, num_sites: int, window: int):
        self.window = window
        self._exit = np.full(window, -2, dtype=np.int64)  # -2: empty slot, -1: final output
        self._agree = np.ones(window, dtype=bool)
        self._written = 0
        self._agree_total = 0
        self._agree_in_window = 0
        self._exits_total = np.zeros(num_sites + 1, dtype=np.int64)  # last entry: final output
        self._counts: dict[str, dict[str, int]] = {"dropped": {}, "errors": {}, "early_stop": {}}
        self._batches = 0
        self._lock = threading.Lock()

    def record(self, exit_sites: np.ndarray, agree: np.ndarray, batches: int = 1) -> float:
        """Record released answers (those of `batches` batches, in order); the window's accuracy."""
        with self._lock:
            n = exit_sites.size
            keep = min(n, self.window)
            rows = (self._written + np.arange(n - keep, n)) % self.window
            # the window's agreeing count, kept current: out with the overwritten, in with the new
            self._agree_in_window += int(agree[n - keep:].sum()) - int(self._agree[rows][self._exit[rows] != -2].sum())
            self._exit[rows] = exit_sites[n - keep:]
            self._agree[rows] = agree[n - keep:]
            self._written += n
            self._agree_total += int(agree.sum())
            self._exits_total += np.bincount(np.where(exit_sites < 0, self._exits_total.size - 1, exit_sites),
                                             minlength=self._exits_total.size)
            self._batches += batches
            m = min(self._written, self.window)
            return self._agree_in_window / m if m else 1.0

    def count(self, group: str, key: str, n: int = 1) -> None:
        with self._lock:
            d = self._counts[group]
            d[key] = d.get(key, 0) + n

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            m = min(self._written, self.window)
            ex = self._exit[:m] if self._written <= self.window else self._exit
            agree = self._agree[:m] if self._written <= self.window else self._agree
            window_rates: dict[str, float] = {}
            if m:
                s, c = np.unique(ex, return_counts=True)
                window_rates = {("final" if k < 0 else str(k)): float(v / m) for k, v in zip(s.tolist(), c.tolist())}
            totals = {str(i): int(v) for i, v in enumerate(self._exits_total[:-1].tolist()) if v}
            totals["final"] = int(self._exits_total[-1])
            return {
                "window": {"inputs": int(m), "accuracy": float(agree.mean()) if m else 1.0,
                           "exit_rates": window_rates},
                "total": {"inputs": int(self._written), "agree": int(self._agree_total),
                          "accuracy": (self._agree_total / self._written) if self._written else 1.0,
                          "exits": totals, "batches": self._batches},
                "dropped": dict(self._counts["dropped"]),
                "errors": dict(self._counts["errors"]),
                "early_stop": {"rows_left": 0, "batches_stopped": 0, **self._counts["early_stop"]},
            }


def show_thresholds(gauge: Any, shown: set[str], sites: tuple[int, ...], thresholds: tuple[float, ...]) -> set[str]:
    """Set a per-site threshold gauge to a configuration: the sites no longer active lose their
    series (a stale threshold would read as active). Returns the sites now shown."""
    labels = {str(s) for s in sites}
    for gone in shown - labels:
        try:
            gauge.remove(gone)
        except KeyError:
            pass
    for s, t in zip(sites, thresholds):
        gauge.labels(str(s)).set(t)
    return labels
