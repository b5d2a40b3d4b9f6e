"""What one served batch tells the control thread (`BatchReport`), and the final output's confidence.

Per-input arrays are in the batch's order and cover every input. With early stop some inputs left
the batch's pass after their release: their later ramps and the model's final answer were never
computed, so `known` marks the rows whose agreement is known and only those count as feedback (each
with its `weight`, the inverse of the probability that it reached the end)."""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from apparate.core.types import exit_sites_of


@dataclass(eq=False)
class BatchReport:
    """One served batch, for the control thread (times in ms)."""

    sites: tuple[int, ...]
    thresholds: tuple[float, ...]
    version: int
    conf: np.ndarray  # [n, R] float64, R = len(sites): the ramps' confidences (learned: the scores served with)
    agree: np.ndarray  # [n, R] bool: the ramp's answer equals the final one (rows in `known` only)
    exit_pos: np.ndarray  # [n] index into sites of the releasing ramp; R = the final output
    released_agree: np.ndarray  # [n] bool: the answer each input got equals the final one (`known` rows)
    release_t: np.ndarray  # [n] perf_counter time each input was released
    batch_size: int
    length: float | None
    site_ms: dict[int, float] = field(default_factory=dict)  # cumulative backbone time, every site seen
    ramp_ms: dict[int, float] = field(default_factory=dict)  # active ramps' own cost
    vanilla_ms: float | None = None  # the whole backbone, ramps and releases excluded
    total_ms: float = 0.0  # batch taken from the queue -> every answer released
    overhead_ms: float = 0.0  # total minus backbone and ramps: encoding, releases, bookkeeping
    feedback: bool = True  # False when a ramp failed: nothing to learn from this batch
    arrivals: np.ndarray | None = None  # [n] perf_counter arrival times (set by the engine)
    t_start: float = 0.0  # batch taken from the queue (perf_counter s)
    t_end: float = 0.0  # every answer released
    # the learned exit rule only (a scorer was given): [n, R, F] features, [n, R] the ramps' own
    # confidences, and the version of the scorer the batch was served with
    features: np.ndarray | None = None
    ramp_conf: np.ndarray | None = None
    scorer_version: int | None = None
    # heads that keep learning only (a heads table was given): each active site's pooled features
    # [n, D] (what its head reads), the model's final answers [n], the heads version served with
    pooled: list[np.ndarray] | None = None
    final: np.ndarray | None = None
    heads_version: int = 0
    # early stop (serve/early_stop.py): [n] rows that reached the final output (None: all), whose
    # agreement is known; [n] each such row's inverse sampling probability (None: all 1); rows that
    # left the batch's pass; whether every row left and the batch stopped before the model's end
    known: np.ndarray | None = None
    weight: np.ndarray | None = None
    left: int = 0
    stopped: bool = False
    late: bool = False  # inputs answered earlier, run again for their feedback (early stop's pool)

    @property
    def known_count(self) -> int:
        """Inputs whose agreement with the model's final answer is known (reached the end)."""
        return self.batch_size if self.known is None else int(np.count_nonzero(self.known))

    def known_rows(self, a: np.ndarray) -> np.ndarray:
        """`a`'s rows (a per-input array) for the inputs that reached the final output."""
        return a if self.known is None else a[self.known]

    def account(self, metrics: Any) -> None:
        """Record the batch in the metrics (exits, agreement, latencies, batch size)."""
        if self.late:  # counted when they were served
            metrics.live.count("early_stop", "rows_rerun", self.batch_size)
            return
        sites = exit_sites_of(tuple(self.sites))[self.exit_pos]
        arr = self.arrivals if self.arrivals is not None else np.full(self.batch_size, self.t_start)
        metrics.batch_done(sites, self.released_agree, self.release_t - arr, self.t_start - arr,
                           self.t_end - self.t_start, self.known)
        if self.left:
            metrics.early_stop(self.left, self.stopped)


SMALL_OUTPUT = 256  # final outputs of up to this many logits: confidences in plain floats


@dataclass(frozen=True, eq=False)
class LabelMap:
    """The model's classes grouped into the target classes (a mapped class's probability is the
    sum of its members')."""

    groups: tuple[int, ...]  # [K] the target class of each of the model's classes
    onehot: np.ndarray  # [K, C] float32, 1 where class k counts as target class c

    @classmethod
    def of(cls, label_map: Any, num_classes: int) -> "LabelMap | None":
        if label_map is None:
            return None
        m = np.asarray(list(label_map), dtype=np.int64)
        onehot = np.zeros((m.size, num_classes), dtype=np.float32)
        onehot[np.arange(m.size), m] = 1.0
        return cls(tuple(int(c) for c in m), onehot)


def final_confidence(logits: Any, labels: LabelMap | None = None) -> np.ndarray:
    """Max softmax of the model's own output, in the target label space (`labels`: mapped classes
    summed; None when the model's classes are the targets).

    On the engine thread, after a forward, where the caches are cold and every step costs several
    times what it costs in a loop (no torch op: each gives the GIL up and may have to wait for it).
    The largest probability is exp(0) / sum of exponentials, a mapped class's its members' summed
    exponentials / sum. A small output (a batch's logits, up to `SMALL_OUTPUT`) is done in plain
    floats: on a ResNet-56 batch of 8 x 10 classes 63 us against 106-127 us in numpy, whose
    reductions cost 46 us each there (in a tight loop both take a few us)."""
    import torch

    z = logits.detach().cpu()  # on a device: after the batch's last wait, so nothing left to wait for
    z = (z if z.dtype == torch.float32 else z.float()).numpy()
    if z.size <= SMALL_OUTPUT:
        out = []
        for row in z.tolist():
            top = max(row)
            e = [math.exp(v - top) for v in row]
            if labels is None:
                out.append(1.0 / sum(e))
            else:
                g = [0.0] * labels.onehot.shape[1]
                for v, c in zip(e, labels.groups):
                    g[c] += v
                out.append(max(g) / sum(e))
        return np.array(out)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    s = e.sum(axis=-1)
    if labels is None:
        return np.reciprocal(s)
    return (e @ labels.onehot).max(axis=-1) / s


def stage_times(rep: BatchReport, sites: tuple[int, ...], site_end: np.ndarray, rel_s: np.ndarray,
                hook_end: np.ndarray, t0: float, t1: float, t_start: float, t_end: float) -> None:
    """Fill `rep`'s stage times (ms) from the executor's clock readings: `site_end` [S] as each
    site's module ended (NaN: not run), `hook_end` [R] as each active ramp's hook ended, `rel_s` [R]
    the time spent handing answers over at it; the forward ran from `t0` to `t1`, the batch from
    `t_start` to `t_end`. Backbone times exclude what the ramps before them cost."""
    pos = {s: j for j, s in enumerate(sites)}
    paid = 0.0  # ramp + release time spent so far inside the forward
    for s in np.flatnonzero(~np.isnan(site_end)).tolist():  # the sites that ran: the active ones
        rep.site_ms[s] = max((site_end[s] - t0 - paid) * 1e3, 0.0)
        j = pos.get(s)
        if j is not None and not np.isnan(hook_end[j]):
            # as paid in the hook: the ramp, scoring, the release test; handing answers over
            # is per released input, not the ramp's cost
            rep.ramp_ms[s] = max((hook_end[j] - site_end[s] - rel_s[j]) * 1e3, 0.0)
            paid += hook_end[j] - site_end[s]
    van = (t1 - t0 - paid) * 1e3
    rep.vanilla_ms = van if van > 0 else None
    rep.total_ms = (t_end - t_start) * 1e3
    rep.overhead_ms = max(rep.total_ms - (van + sum(rep.ramp_ms.values())), 0.0)
