"""What a replay run measured: latency percentiles, throughput, goodput, drops, accuracy against
the original model (overall and the worst sliding window), label accuracy, exits per site and
how many candidate ramps were active."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from apparate.core.exits import sliding_min_mean

from .simulator import DROPPED, RunResult


@dataclass(frozen=True)
class Metrics:
    policy: str
    requests: int
    served: int
    dropped: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    throughput: float  # served requests per second over the run
    goodput: float  # requests answered within the SLO per second
    accuracy: float  # released answers equal to the original model's, over served requests
    worst_window_accuracy: float  # the same over the worst window of `window` served requests
    label_accuracy: float | None  # released answers equal to the labels, where known
    exit_rates: dict[int, float] = field(default_factory=dict)  # site -> share of served released there
    final_rate: float = 1.0
    active_share: float = 0.0  # mean share of candidate ramps active per batch
    mean_batch: float = 0.0
    window: int = 500
    completed: float = 1.0  # share of served requests that ran to the final output (early stop: < 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["exit_rates"] = {str(k): v for k, v in self.exit_rates.items()}
        return d


def summarize(run: RunResult, window: int = 500) -> Metrics:
    served = run.served
    lat = run.latency_ms[served]
    n_served = int(served.sum())
    if n_served:
        span = float(np.nanmax(run.release) - run.arrival[0])
        span = max(span, 1e-9)
        p50, p95, p99 = (float(v) for v in np.percentile(lat, [50, 95, 99]))
        mean = float(lat.mean())
    else:
        span, p50, p95, p99, mean = 1.0, float("nan"), float("nan"), float("nan"), float("nan")
    within = int((lat <= run.slo_ms + 1e-9).sum())
    ex = run.exit_site[served]
    sites, counts = np.unique(ex[ex >= 0], return_counts=True)
    label_acc = None
    if run.label_correct is not None:
        known = served if run.labeled is None else served & run.labeled
        if known.any():  # texts without a label (e.g. plot synopses) do not count
            label_acc = float(run.label_correct[known].mean())
    return Metrics(
        policy=run.policy,
        requests=int(run.arrival.size),
        served=n_served,
        dropped=int((run.exit_site == DROPPED).sum()),
        p50_ms=p50, p95_ms=p95, p99_ms=p99, mean_ms=mean,
        throughput=n_served / span,
        goodput=within / span,
        accuracy=float(run.correct[served].mean()) if n_served else float("nan"),
        worst_window_accuracy=sliding_min_mean(run.correct[served], window),
        label_accuracy=label_acc,
        exit_rates={int(s): float(c / max(n_served, 1)) for s, c in zip(sites, counts)},
        final_rate=float((ex == -1).mean()) if n_served else 1.0,
        completed=1.0 if run.completed is None or not n_served else float(run.completed[served].mean()),
        active_share=float(run.batch_active.mean() / max(run.num_sites, 1)) if run.batch_active.size else 0.0,
        mean_batch=float(run.batch_size.mean()) if run.batch_size.size else 0.0,
        window=window,
    )
