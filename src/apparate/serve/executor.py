"""The executor: one batch through the EarlyExitModel, answers released at the ramps.

At each active ramp the hook of the EarlyExitModel calls back here the moment the ramp has run;
the inputs not yet released whose `1 - confidence < threshold` are answered right there (their
HTTP clients get the response while the batch continues), the rest when the model ends. An input
is released at most once, at the first active ramp that fires: exactly the rule
`core.exits.first_exit` applies, so what was served and what the controller evaluates agree.

Measured stage times come from the clock the EarlyExitModel reads as each active site's module
ends, before its ramp: the cumulative backbone time to each active site (ramp and release time
subtracted), each active ramp's own cost, the whole backbone, and the engine's own overhead. They go with the
batch's feedback to the control thread, which moves the LatencyProfile toward them.

With the learned exit rule (`apparate-learned`) the engine hands `run` the control thread's
current `Scorer` (an immutable snapshot, swapped whole between batches). At each active ramp that
can release, the executor then computes `core.evidence.features` for that ramp on the batch's
inputs, from the ramp's confidence and answer, the stream context it holds (the latest final
answer known: the previous batch's last input; per site the previous input's answer and
confidence) and, for image models, how far the site's pooled features moved since the previous
input (`core.evidence.movement` on the spatial sums the EarlyExitModel hands over on request, from
the ramp's own pooling where it pools; the
batch's first input compares with the previous batch's last input at that site, NaN when the site
did not run on it). It releases the inputs whose `1 - score < threshold`, the rule the replay's
`LearnedPolicy.plan` applies. Ramps that cannot release are featured after the batch. The report
carries the features and the scores (as `conf`) for the policy's buffer and the controller's
window. Without a scorer none of this runs: the path is the confidence rule's, unchanged.

A ramp (or release) that raises: the batch is run again with no ramps and answered from the
final output, the error is counted and logged, and the batch gives no feedback. If the bare
model fails too, the unreleased inputs get HTTP 500 and the engine carries on.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

import numpy as np

from apparate.core.controller import Config
from apparate.core.evidence import F, Scorer, StreamContext, features, features_one, movement, movement_one
from apparate.devices import device_of
from apparate.model.ramp_results import score_all
from apparate.model.host_copy import host_release_for
from apparate.model.sites import primary_output

from .model_io import ServedModel
from .early_stop import EarlyStop
from .report import BatchReport, LabelMap, final_confidence, stage_times
from .requests import Answer, FinalTarget, Rejected, Request, Result

SMALL_BATCH = 4  # the learned rule scores batches up to this size in plain floats (docs/serve.md)

log = logging.getLogger("apparate.serve")

Release = Callable[[list[tuple[Request, Result]]], None]


class Executor:
    def __init__(self, served: ServedModel, release: Release, movement: bool = True):
        self.served = served
        self.ee = served.ee
        self.release = release
        self.clock = time.perf_counter  # the EarlyExitModel's stamps use the same clock
        self._labels = LabelMap.of(served.label_map, served.num_classes)
        self.ramp_failures = 0
        self.model_failures = 0
        # called as each batch enters the model: the engine hands the previous batch's report over
        self.on_model_start: Callable[[], None] | None = None
        self.drop_refused: str | None = None  # why early stop cannot drop rows of this model (check_early_stop)
        self._active: tuple[int, ...] | None = None
        # the learned rule's view of the stream (used only when a batch comes with a scorer)
        # feature movement: image models, as recordings keep it (unless the rule is set without it)
        self._pool = movement and served.kind == "image"
        # On a CUDA device ramp answers reach the host on a waiter thread (model.host_copy); on
        # the CPU (None) the hook releases directly.
        self._host = host_release_for(device_of(self.ee))
        self.reset_stream()

    def reset_stream(self) -> None:
        """Forget the previous inputs (the learned rule's stream context and pooled features)."""
        S = self.ee.num_sites
        self.ctx = StreamContext.empty(S)
        self.prev_pooled: list[np.ndarray | None] = [None] * S

    def _use_sites(self, sites: tuple[int, ...]) -> None:
        """On a configuration change: make `sites` the model's active set, so that their ramp hooks
        stay attached between batches (attaching them per batch costs more than the ramps)."""
        if sites != self._active:
            self.ee.set_active(sites)
            self._active = sites

    def close(self) -> None:
        """Detach the ramps (the backbone is then the bare model again)."""
        self.ee.set_active(())
        self._active = None
        if self._host is not None:
            self._host.close()

    # ------------------------------------------------------------------------------------------
    def warm_up(self, sizes: Sequence[int], sites: Sequence[int]) -> None:
        """Run a few batches so that first real requests do not pay one-off costs."""
        for b in sizes:
            x = self.served.codec.encode(self.served.codec.example(b))
            for _ in range(2):
                self.ee(x, active=tuple(sites))

    def check_early_stop(self, size: int = 4) -> str | None:
        """Before serving with early stop: does dropping rows between sites give this model's own
        answers for the rest (`drop_rows_work` on an example batch, texts of different lengths)?
        If not, early stop is refused (`drop_refused` says why) and every input runs to the end."""
        from apparate.model.early_exit import drop_rows_work

        if not self.ee.num_sites:
            self.drop_refused = "the model has no sites"
            return self.drop_refused
        codec = self.served.codec
        if self.served.kind == "text":  # different lengths: the attention mask has padding to cut
            cap = getattr(codec, "max_tokens", None) or 64
            items = [codec.example(1, max(3, cap * (k + 1) // size))[0] for k in range(size)]
        else:
            items = codec.example(size)
        self.drop_refused = drop_rows_work(self.ee, codec.encode(items))
        return self.drop_refused

    def run(self, batch: list[Request], cfg: Config, t_start: float, scorer: Scorer | None = None,
            stop: EarlyStop | None = None, heads: Any = None) -> BatchReport | None:
        """Serve one batch with `cfg`; every input is released exactly once (answer or error).
        With a `scorer` (the learned exit rule) inputs are released on its scores (module doc).
        With `stop` (the confidence rule only, and a model whose rows can be dropped), inputs
        released while work is waiting leave the batch's pass (`serve/early_stop.py`). With `heads`
        (heads that keep learning: the `HeadsTable` the engine applied) the report carries each
        active site's pooled features and the final answers."""
        n = len(batch)
        R = len(cfg.sites)
        pos = {s: j for j, s in enumerate(cfg.sites)}
        conf = np.zeros((n, R))
        pred = np.zeros((n, R), dtype=np.int64)
        ran = np.zeros(R, dtype=bool)
        pending = np.ones(n, dtype=bool)
        exit_pos = np.full(n, R, dtype=np.int64)
        release_t = np.zeros(n)
        site_end = np.full(self.ee.num_sites, np.nan)
        hook_end = np.full(R, np.nan)
        rel_s = np.zeros(R)  # time spent handing answers over, per ramp (not the ramp's own cost)
        clock = self.clock

        thr_of = cfg.thresholds

        def release_at(j: int, r: Any, idx: Sequence[int], at: Sequence[int] | None = None) -> None:
            """Answer inputs `idx` (none released yet) with ramp j's answers, now; `at`: their rows
            in the ramp's result when rows have left the batch (else the same as `idx`)."""
            now = clock()
            c, p = r.conf, r.pred
            # Marked released only once handed over: if the release raises, the batch's fallback
            # (re-run without ramps) still answers them (a future already set keeps its answer).
            self.release([(batch[i], self._answer(batch[i], int(p[k]), float(c[k]), r.site, True,
                                                  t_start, now, n, cfg.version))
                          for i, k in zip(idx, idx if at is None else at)])
            pending[list(idx)] = False
            exit_pos[list(idx)] = j
            release_t[list(idx)] = now
            rel_s[j] = clock() - now

        def on_ramp(r: Any) -> None:
            j = pos[r.site]
            ran[j] = True
            t = thr_of[j]
            if t > 0:  # only a ramp that can release is scored now; the rest after the batch
                # float64, as the controller tests it: the same decision, bit for bit
                if n == 1:  # the common case under light load: scalars cost less than arrays
                    idx = (0,) if pending[0] and 1.0 - float(r.conf[0]) < t else ()
                else:
                    idx = np.flatnonzero(pending & ((1.0 - r.conf) < t))
                if len(idx):
                    release_at(j, r, idx)
            hook_end[j] = clock()

        learned = scorer is not None
        if stop is not None and (learned or heads is not None or n < 1 or self.drop_refused is not None):
            stop = None  # the learned rule keeps every input to the end; so does a model that cannot drop
        if stop is not None:
            # Early stop: inputs released while work waits leave the pass, unless sampled (weight
            # 1/sample) or their caller wants the model's own answer too (they never leave).
            left = np.zeros(n, dtype=bool)
            weight = np.ones(n)
            stays = np.fromiter((r.final is not None for r in batch), dtype=bool, count=n)
            first_drop = [-1]  # the site of the first drop: later stage times are not full-batch times

            def on_ramp_stop(r: Any) -> np.ndarray | None:
                j = pos[r.site]
                ran[j] = True
                t = thr_of[j]
                keep = None
                if t > 0:
                    rows = r.rows  # the ramp's rows in the batch (None: all, in order)
                    here = pending if rows is None else pending[rows]
                    # (a one-row result's confidence is a tuple: the scorer's fast path for batch 1)
                    at = np.flatnonzero(here & ((1.0 - np.asarray(r.conf, dtype=np.float64)) < t))
                    idx = at if rows is None else rows[at]
                    if idx.size:
                        release_at(j, r, idx, at)
                        if stop.may_leave(r.site) and stop.waiting():
                            go, w = stop.leave(batch, idx, stays[idx], cfg, j)
                            weight[idx[~go]] = w[~go]  # kept by the coin: they stand for 1/p inputs
                            if go.any():
                                left[idx[go]] = True
                                keep = np.ones(r.logits.shape[0], dtype=bool)
                                keep[at[go]] = False
                                if first_drop[0] < 0:
                                    first_drop[0] = r.site
                hook_end[j] = clock()
                return keep

        if learned:
            cols = np.asarray(cfg.sites, dtype=np.int64)
            X = np.zeros((n, R, F))
            score = np.zeros((n, R))
            featured = np.zeros(R, dtype=bool)
            pooled: list[np.ndarray | None] = [None] * R
            ctx, prev_pooled, pool = self.ctx, self.prev_pooled, self._pool

            small: dict[int, tuple[list[list[float]], list[float]]] = {}  # ramp j's rows' features, scores

            def score_small(j: int, r: Any) -> list[float]:
                """Ramp j's scores for a batch of at most SMALL_BATCH, in plain floats (numpy's
                per-call cost would be most of the work, paid inside the model), bit for bit the
                batch rule's; the features wait in `small` and reach X after the answers are out."""
                site = int(r.site)
                c, p = [float(v) for v in r.conf], [int(v) for v in r.pred]
                prev_p, prev_c = int(ctx.prev_pred[site]), float(ctx.prev_conf[site])
                f = prev_f = None
                if pool:
                    pooled[j] = r.sums
                    f = r.sums.tolist()  # plain floats: what `movement_one` reads cheaply
                    prev_f = None if prev_pooled[site] is None else prev_pooled[site][0].tolist()
                xs, ss = [], []
                for k in range(n):  # each input's previous is the row above (the first: the context's)
                    m = None
                    if f is not None:
                        m, prev_f = movement_one(f[k], prev_f), f[k]
                    x = features_one(c[k], p[k], ctx.last_final, prev_p, prev_c, m)
                    xs.append(x)
                    ss.append(scorer.score_one(x, site, c[k]))  # the replay's score, bit for bit
                    prev_p, prev_c = p[k], c[k]
                small[j] = (xs, ss)
                return ss

            def featurize(j: int, r: Any) -> np.ndarray:
                """Features and scores of ramp j (site r.site) for a batch larger than SMALL_BATCH: [n]."""
                c = np.asarray(r.conf, dtype=np.float64).reshape(n, 1)
                p = np.asarray(r.pred, dtype=np.int64).reshape(n, 1)
                site = cols[j:j + 1]
                mv = None
                if pool:
                    pooled[j] = r.sums
                    mv = movement(r.sums, prev_pooled[r.site]).reshape(n, 1)
                xj = features(c, p, site, ctx, mv)
                sj = scorer.score(xj, site, c)
                X[:, j] = xj[:, 0]
                score[:, j] = sj[:, 0]
                featured[j] = True
                return score[:, j]

            def on_ramp_learned(r: Any) -> None:
                j = pos[r.site]
                ran[j] = True
                t = thr_of[j]
                if t > 0:  # only a ramp that can release is scored now; the rest after the batch
                    if n <= SMALL_BATCH:
                        ss = score_small(j, r)
                        idx = [k for k in range(n) if pending[k] and 1.0 - ss[k] < t]
                    else:
                        idx = np.flatnonzero(pending & ((1.0 - featurize(j, r)) < t))
                    if len(idx):
                        release_at(j, r, idx)
                hook_end[j] = clock()

        try:
            x = self.served.codec.encode([r.item for r in batch])
            length = self.served.codec.length(x)
        except Exception as e:  # noqa: BLE001 - a failing batch must not take the server down
            return self._fail(batch, pending, e)
        feedback = True
        self._use_sites(cfg.sites)
        if self.on_model_start is not None:
            self.on_model_start()
        try:
            t0 = clock()
            host = self._host
            if host is not None:  # a CUDA model: the hook launches copies, a waiter releases (model.host_copy)
                on_ramp = on_ramp_learned = host.bind(on_ramp_learned if learned else on_ramp)
            if learned:
                out = self.ee(x, on_ramp=on_ramp_learned, active=cfg.sites, stamps=site_end, detect=pool)
            elif stop is not None:
                out = self.ee(x, on_ramp=on_ramp_stop, active=cfg.sites, stamps=site_end)
            else:
                out = self.ee(x, on_ramp=on_ramp, active=cfg.sites, stamps=site_end, pool=heads is not None)
            if host is not None:
                host.finish()  # every ramp handled and the device done; a callback's error is raised here
                site_end[:] = np.nan  # host stamps of kernel launches, not of stage ends: no stage times
            t1 = clock()
        except Exception as e:  # noqa: BLE001
            if self._host is not None:
                self._host.abandon()  # a forward that raised: wait out the ramps it had queued
            if not R:
                return self._fail(batch, pending, e)
            site_end[:] = np.nan  # the failed run's times are not this batch's
            hook_end[:] = np.nan
            if stop is not None:  # the run below computes every row
                left[:] = False
                weight[:] = 1.0
                first_drop[0] = -1
            try:  # without ramps: if this works, a ramp (or a release) was at fault
                t0 = clock()
                out = self.ee(x, active=())
                t1 = clock()
            except Exception as e2:  # noqa: BLE001
                return self._fail(batch, pending, e2)
            self.ramp_failures += 1
            feedback = False
            log.error("a ramp failed (active %s): %s: %s; this batch is served without early exits",
                      list(cfg.sites), type(e).__name__, e)
            self.on_error("ramp")

        rows = out.rows  # the final output's rows in the batch (None: every row, in order)
        if rows is None:
            final_pred = out.final_pred.cpu().numpy()
            fconf = final_confidence(primary_output(out.final), self._labels)
        else:  # rows left the pass: their final answers were never computed (-1)
            final_pred = np.full(n, -1, dtype=np.int64)
            fconf = np.zeros(n)
            if rows.size:
                final_pred[rows] = out.final_pred.cpu().numpy()
                fconf[rows] = final_confidence(primary_output(out.final), self._labels)
        now = clock()
        rest = np.flatnonzero(pending)
        release_t[rest] = now
        fp, fc = final_pred.tolist(), fconf.tolist()  # (Python scalars: per input, numpy's cost more)
        if rest.size:
            self.release([(batch[i], self._answer(batch[i], fp[i], fc[i], -1, False, t_start, now, n, cfg.version))
                          for i in rest.tolist()])
        if rest.size < n:  # early answers whose callers asked for the model's own too
            finals = [(FinalTarget(batch[i].final, batch[i].loop),
                       self._answer(batch[i], fp[i], fc[i], -1, False, t_start, now, n, cfg.version))
                      for i in np.flatnonzero(exit_pos < R).tolist() if batch[i].final is not None]
            if finals:
                self.release(finals)
        t_end = clock()
        results = [out.ramps[s] for s in cfg.sites if s in out.ramps]
        score_all(results)  # the ramps that could not release, in one step, after every answer is out
        for r in results:
            at = slice(None) if r.rows is None else r.rows
            conf[at, pos[r.site]] = r.conf
            pred[at, pos[r.site]] = r.pred

        agree = pred == final_pred[:, None]
        rel_agree = np.ones(n, dtype=bool)
        early = exit_pos < R
        rel_agree[early] = agree[np.flatnonzero(early), exit_pos[early]]
        fed = feedback and bool(ran.all())
        report = BatchReport(cfg.sites, cfg.thresholds, cfg.version, conf, agree, exit_pos, rel_agree, release_t, n, length,
                             feedback=fed)
        if learned:
            if fed:
                for r in results:  # the ramps that could not release: featured now
                    if not featured[pos[r.site]] and pos[r.site] not in small:
                        (score_small if n <= SMALL_BATCH else featurize)(pos[r.site], r)
            for j, (xs, ss) in small.items():  # a small batch's, in floats until now
                X[:, j], score[:, j], featured[j] = xs, ss, True
            if fed:
                report.features, report.ramp_conf, report.conf = X, conf, score
                report.scorer_version = scorer.version
                self._advance(cols, conf, pred, final_pred, pooled)
            else:  # the ramps' answers are not this batch's: only its final answers are known
                self._advance(np.zeros(0, dtype=np.int64), conf[:, :0], pred[:, :0], final_pred, [])
        if heads is not None and fed:
            report.pooled = [out.ramps[s].pooled for s in cfg.sites]
            report.final, report.heads_version = final_pred, heads.version
        stage_times(report, cfg.sites, site_end, rel_s, hook_end, t0, t1, t_start, t_end)
        if stop is not None and left.any():
            report.known, report.left, report.stopped = ~left, int(left.sum()), out.final is None
            # after the first drop the stages ran on fewer rows: not this batch size's costs
            report.site_ms = {k: v for k, v in report.site_ms.items() if k <= first_drop[0]}
            report.ramp_ms = {k: v for k, v in report.ramp_ms.items() if k <= first_drop[0]}
            report.vanilla_ms = None  # (the profile takes a batch's times only with its whole backbone's)
        if stop is not None and (weight != 1.0).any():
            report.weight = weight
        return report

    def rerun(self, batch: list[Request], exit_pos: np.ndarray, cfg: Config, abandon: Callable[[], bool]
              ) -> BatchReport | None:
        """Run again, for their feedback, inputs that were answered at ramp `exit_pos` [n] of `cfg`
        and left their batch (early stop's pool): their final answers and every active ramp's, as a
        report with `late` set (nothing is released). None if `abandon()` turned true at a ramp
        (the run stops there); a failure raises."""
        n, R = len(batch), len(cfg.sites)

        def check(r: Any) -> np.ndarray | None:
            return np.zeros(r.logits.shape[0], dtype=bool) if abandon() else None

        x = self.served.codec.encode([r.item for r in batch])
        self._use_sites(cfg.sites)
        out = self.ee(x, on_ramp=check, active=cfg.sites)
        if out.final is None:
            return None
        results = [out.ramps[s] for s in cfg.sites]
        score_all(results)
        conf = np.stack([np.asarray(r.conf, dtype=np.float64) for r in results], axis=1).reshape(n, R)
        pred = np.stack([np.asarray(r.pred) for r in results], axis=1).reshape(n, R)
        agree = pred == out.final_pred.cpu().numpy()[:, None]
        report = BatchReport(cfg.sites, cfg.thresholds, cfg.version, conf, agree, exit_pos,
                             agree[np.arange(n), exit_pos], np.zeros(n), n, self.served.codec.length(x))
        report.late = True
        return report

    def _advance(self, cols: np.ndarray, conf: np.ndarray, pred: np.ndarray, final: np.ndarray,
                 pooled: list[np.ndarray | None]) -> None:
        """After a batch: its last input becomes the previous one, at the sites that ran on it."""
        self.ctx.advance(cols, conf, pred, final)
        prev = self.prev_pooled
        prev[:] = [None] * len(prev)
        for s, f in zip(cols.tolist(), pooled):
            if f is not None and len(f):
                prev[s] = f[-1:]

    def _answer(self, req: Request, label: int, conf: float, site: int, early: bool, t_start: float, now: float,
                n: int, version: int) -> Answer:
        return Answer(label=label, confidence=conf, exit_site=site, early=early,
                      queue_ms=(t_start - req.arrival) * 1e3, compute_ms=(now - t_start) * 1e3,
                      latency_ms=(now - req.arrival) * 1e3, batch_size=n, version=version)

    def _fail(self, batch: list[Request], pending: np.ndarray, err: BaseException) -> None:
        self.model_failures += 1
        self.reset_stream()  # whatever these inputs were, the next batch cannot compare with them
        log.error("the model failed on a batch of %d: %s: %s", len(batch), type(err).__name__, err)
        self.on_error("model")
        msg = f"model error: {type(err).__name__}: {err}"[:300]
        self.release([(batch[i], Rejected(500, msg)) for i in np.flatnonzero(pending)]
                     + [(FinalTarget(r.final, r.loop), Rejected(500, msg)) for i, r in enumerate(batch)
                        if not pending[i] and r.final is not None])  # released early: no final answer comes
        return None

    def on_error(self, kind: str) -> None:
        """Overridden by the engine to count errors."""
