"""The control thread: batch feedback in, new configurations out, off the critical path.

The engine thread hands each served batch's report to `ControlLoop.submit` (a bounded queue,
never blocking: when the controller falls behind, reports are dropped and counted rather than
slowing serving down). The control thread then

1. moves the LatencyProfile toward the measured stage times (`LatencyProfile.updated`, pooled
   per batch shape and applied every `profile_every_s`), so that batch-time predictions and ramp
   decisions use this machine's real costs;
2. for the apparate policy, gives the batch's confidences and agreements to the controller
   (`Controller.observe`), which returns the configuration for the next batches;
3. replaces its `live` snapshot (configuration + precomputed batch costs, an immutable value) by
   one reference swap; the engine reads `control.live` once per batch, so a configuration
   changes only between batches and nothing calls back into the engine;
4. checkpoints the state every `checkpoint_every_s` seconds (and once more at shutdown).

Policies come from `apparate.policies.catalog`, the same ones replay runs (`serving_policy`; from a
configuration given or checkpointed, `configured_policy`; around a restored controller,
`restored_policy`): `apparate` and `apparate-all` (the controller adapts, at the user's budget or
at one admitting every ramp), `static` (the initial placement, never changed), `branchynet` /
`branchynet+` (every ramp, one shared or per-ramp thresholds tuned once on the bootstrap),
`vanilla` (no ramps), and `apparate-learned` (the controller tunes thresholds on the learned
exit rule's scores: `live` also carries the current `Scorer`, a new one after each refit, with
which the executor scores every batch; the batch's features come back in its report and go to the
policy's buffer in arrival order). All keep the profile current, so they batch on the same footing.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from apparate.core.controller import Config, Controller, Feedback
from apparate.core.evidence import Scorer
from apparate.core.profile import LatencyProfile
from apparate.core.settings import Settings
from apparate.policies import Policy, check_servable, serving_policy
from apparate.policies.catalog import all_ramps_budget, configured_policy

from .costs import BatchCosts
from .report import BatchReport
from .feedback import merged_feedback
from .restore import try_restore
from .state import save_state

log = logging.getLogger("apparate.serve")

_STOP = object()
_NUDGE = object()  # the policy's configuration changed outside feedback (a cluster tuner's push)
BACKLOG_INPUTS = 64  # reports waiting for the control thread are merged up to this many inputs


@dataclass(frozen=True)
class ControlOptions:
    policy: str = "apparate"
    settings: Settings | None = None  # None: Settings.for_kind(the served model's kind)
    initial: Config | None = None  # override the initial placement (experiments, tests)
    state_dir: str | Path | None = None
    checkpoint_every_s: float = 30.0
    restore: bool = True  # start from the state directory's checkpoint when it fits (not for a swapped-in bundle)
    profile_weight: float = 0.1  # smoothing weight of one batch's measured times
    update_profile: bool = True
    profile_every_s: float = 0.25  # measured times are pooled per batch shape and applied this often
    feedback_min_inputs: int = 1  # pool batches into controller batches of at least this many inputs (1: every batch, as replay)
    max_pending: int = 256  # batch reports waiting for the controller before new ones are dropped
    remote: Policy | None = None  # replaces the local policy: apparate.cluster's, fed by a tuner elsewhere

    def __post_init__(self) -> None:
        check_servable(self.policy)
        if not 0 < self.profile_weight <= 1:
            raise ValueError(f"profile_weight must be in (0, 1], got {self.profile_weight}")


@dataclass(frozen=True, eq=False)
class Live:
    """What the engine applies to the next batch; replaced as a whole, never mutated."""

    config: Config
    costs: BatchCosts
    scorer: Scorer | None = None  # the learned exit rule's current fit (apparate-learned only)
    heads: Any = None  # heads that keep learning: the current `HeadsTable` (apparate+heads only)


class ControlLoop:
    """Owns the latency profile (the bundle's, calibrated at start, then measured) and the policy's
    state; hands the engine `live`, a snapshot it replaces whole."""

    def __init__(self, served: Any, options: ControlOptions, metrics: Any, profile: LatencyProfile | None = None,
                 max_batch: int = 16, max_tokens: int | None = None):
        self.served = served
        self.options = options
        self.metrics = metrics
        self.max_batch, self.max_tokens = max_batch, max_tokens
        self.settings = options.settings or Settings.for_kind(served.kind)
        self.initial_profile: LatencyProfile = profile if profile is not None else served.profile
        self.profile: LatencyProfile = self.initial_profile
        if options.policy == "apparate-all":
            self.settings = self.settings.replace(ramp_budget=all_ramps_budget(self.profile))
        self.restored: dict[str, Any] = {"from": None}
        self.policy: Policy = self._initial()
        self.config = self.policy.config
        self.overhead_ms = 0.0
        self.handled = 0
        self._q: queue.Queue = queue.Queue(maxsize=options.max_pending)
        self._thread: threading.Thread | None = None
        self._last_event: Any = None
        self._last_costs = 0.0
        self._stats: dict[str, Any] = {}
        self._busy_s = 0.0
        self.last_checkpoint: float | None = None
        self._pending: list[BatchReport] = []
        self._times: dict[tuple[int, float | None], dict[str, Any]] = {}
        self._times_at = 0.0  # the first batch's times apply at once
        self._costs_stale = False
        self._publish(self.config)
        self._refresh_stats(force=True)

    @property
    def controller(self) -> Controller | None:
        """The adaptive policy's controller (its window, events, state); None for fixed policies."""
        return getattr(self.policy, "controller", None)

    # ------------------------------------------------------------------------------ start-up
    def _initial(self) -> Policy:
        """The policy to start with, built by `apparate.policies` as replay builds it: restored
        from the state directory, else from the configuration given, else placed and tuned on the
        bootstrap recording."""
        opt, served, s = self.options, self.served, self.settings
        if opt.remote is not None:
            return opt.remote
        if opt.state_dir is not None and opt.restore:
            got = try_restore(opt, served, s, self.profile)
            self.profile, self.restored = got.profile, got.info
            if got.policy is not None:
                return got.policy
        if opt.policy == "vanilla" or opt.initial is not None:
            return configured_policy(opt.policy, opt.initial or Config(), self.profile, s, served.recording,
                                     heads=getattr(served, "ee", None))
        if served.recording is None:
            raise ValueError("no bootstrap recording to place the initial ramps: give an initial config")
        rec = served.recording
        # Placement and one-time tuning at batch 1 (the strictest for the budget, and what an idle
        # server serves); the controller re-judges at the batch size it serves.
        length = None if rec.lengths is None else float(np.mean(rec.lengths))
        return serving_policy(opt.policy, rec, self.profile, s, (1.0, length), heads=getattr(served, "ee", None))

    # ------------------------------------------------------------------------------ thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="apparate-control", daemon=True)
        self._thread.start()

    def submit(self, report: BatchReport) -> None:
        try:
            self._q.put_nowait(report)
        except queue.Full:  # the controller is behind: skip this batch's feedback, keep its metrics
            self.metrics.feedback_dropped.inc()
            report.account(self.metrics)

    def nudge(self) -> None:
        """Re-read the policy's configuration soon (it changed outside feedback); any thread."""
        try:
            self._q.put_nowait(_NUDGE)
        except queue.Full:  # the next report is soon; its handling re-reads it too
            pass

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every submitted report has been handled (tests, benchmarks)."""
        end = time.monotonic() + timeout
        with self._q.all_tasks_done:  # queue.Queue's own condition: notified when the count hits 0
            while self._q.unfinished_tasks and time.monotonic() < end:
                self._q.all_tasks_done.wait(max(end - time.monotonic(), 0.0))

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._q.put(_STOP)
            self._thread.join(timeout)
        self._thread = None
        self.checkpoint()

    def _run(self) -> None:
        every = self.options.checkpoint_every_s
        next_ckpt = time.monotonic() + every
        while True:
            wait = max(next_ckpt - time.monotonic(), 0.01) if self.options.state_dir is not None else 1.0
            try:
                rep = self._q.get(timeout=wait)
            except queue.Empty:
                rep = None
            try:
                if rep is _STOP:
                    self._observe_pending()  # a partial pool still belongs in the window
                    return
                if rep is not None:
                    self._handle(rep)
            except Exception:  # noqa: BLE001 - the controller thread must survive anything
                log.exception("feedback handling failed")
                self.metrics.error("feedback")
            finally:
                if rep is not None:
                    self._q.task_done()
            if self.options.state_dir is not None and time.monotonic() >= next_ckpt:
                try:
                    self.checkpoint()
                except Exception:  # noqa: BLE001
                    log.exception("checkpoint failed")
                    self.metrics.error("checkpoint")
                next_ckpt = time.monotonic() + every

    def _handle(self, rep: BatchReport) -> None:
        if rep is _NUDGE:  # a cluster replica's policy took a Config pushed by the tuner
            if sum(r.known_count for r in self._pending) >= self.options.feedback_min_inputs:
                self._observe_pending()  # held only because this nudge was queued behind it
            return self._publish(self.policy.config)
        t = time.perf_counter()
        rep.account(self.metrics)
        if self.options.update_profile and rep.vanilla_ms:
            self._pool_times(rep)
        w = 0.0 if rep.late else self.options.profile_weight  # a re-run (early stop's pool) was not timed
        self.overhead_ms = rep.overhead_ms if self.handled == 0 else (1 - w) * self.overhead_ms + w * rep.overhead_ms
        cfg = self.config
        if self.policy.adaptive and rep.feedback:  # fixed policies learn nothing: no pooling for them
            for fb in self._pool_feedback(rep, backlog=self._q.qsize() > 0):
                if self.controller is not None:  # a cluster replica's policy has none: its tuner does
                    self.controller.profile = self.profile
                cfg = self.policy.feedback(fb)
                self._log_events()
        self.handled += 1
        now = time.monotonic()
        changed = cfg != self.config or self._scorer_changed() or self._heads() is not self.live.heads
        if changed or (self._costs_stale and now - self._last_costs >= 0.1):
            self._publish(cfg)
        self._refresh_stats(force=changed)
        self._busy_s += time.perf_counter() - t

    def _pool_feedback(self, rep: BatchReport, backlog: bool = False) -> list[Feedback]:
        """The feedback to give the policy now, in serving order (usually one, or none).

        By default every batch is given to the controller as it was served, as the replay gives
        it, so a server and its replay reach the same decisions. Two exceptions pool batches
        served with the same configuration into one Feedback:

        * while more reports wait behind this one (`backlog`: the control thread fell behind),
          they are merged, up to `BACKLOG_INPUTS` inputs: one controller step instead of many,
          and no feedback is later for it (the next report is already here);
        * `feedback_min_inputs` > 1 pools until that many inputs (a cluster replica pools to its
          max batch: fewer messages to its tuner).

        A wrong answer released early never waits in a pool: the violation and drift checks act
        on it at once (while it waits the same thresholds keep releasing; on the video camera day
        at 30 frames/s, pools of 16 cost 0.47 points of accuracy; docs/results.md). A batch served
        with another configuration closes the pool before it (given as its own Feedback; nothing
        is discarded)."""
        out: list[Feedback] = []
        pend = self._pending
        if pend and (pend[0].sites, pend[0].thresholds) != (rep.sites, rep.thresholds):
            out += self._take_pending()
            pend = self._pending
        pend.append(rep)
        wrong = not bool(np.all(rep.known_rows(rep.released_agree)))  # early stop: inputs that reached the end
        known = sum(r.known_count for r in pend)
        hold = known < self.options.feedback_min_inputs or (backlog and known < BACKLOG_INPUTS)
        if wrong or not hold:
            out += self._take_pending()
        return out

    def _take_pending(self) -> list[Feedback]:
        """The pool as one Feedback (none if no input in it reached the final output), emptied."""
        pend, self._pending = self._pending, []
        return [merged_feedback(pend)] if any(r.known_count for r in pend) else []

    def _observe_pending(self) -> None:
        if not self.policy.adaptive:
            self._pending = []
            return
        for fb in self._take_pending():  # (early stop: none if no input reached the end)
            if self.controller is not None:
                self.controller.profile = self.profile
            self.config = self.policy.feedback(fb)

    def _pool_times(self, rep: BatchReport) -> None:
        """Pool measured times per batch shape; every `profile_every_s` move the profile toward
        each shape's mean once, with the weight `count` single updates would have had. Updating
        on every batch would cost the control thread more than the rest of its work."""
        key = (rep.batch_size, rep.length)
        acc = self._times.setdefault(key, {"n": 0, "van": 0.0, "site": {}, "ramp": {}})
        acc["n"] += 1
        acc["van"] += rep.vanilla_ms
        for name, values in (("site", rep.site_ms), ("ramp", rep.ramp_ms)):
            for k, v in values.items():
                n_v = acc[name].setdefault(k, [0, 0.0])
                n_v[0] += 1
                n_v[1] += v
        now = time.monotonic()
        if now - self._times_at < self.options.profile_every_s:
            return
        self._times_at = now
        w = self.options.profile_weight
        for (bs, length), a in self._times.items():
            n = a["n"]
            mean = {name: {k: tot / c for k, (c, tot) in a[name].items()} for name in ("site", "ramp")}
            self.profile = self.profile.updated(bs, mean["site"], mean["ramp"], a["van"] / n, length,
                                                1.0 - (1.0 - w) ** n)
        self._times.clear()
        self._costs_stale = True

    def _scorer(self) -> Scorer | None:
        make = getattr(self.policy, "scorer", None)
        return make() if make is not None else None

    def _heads(self) -> Any:
        table = getattr(self.policy, "table", None)
        return table() if table is not None else None

    def _scorer_changed(self) -> bool:
        scorer = self._scorer()
        return scorer is not None and scorer is not self.live.scorer

    def _publish(self, cfg: Config) -> None:
        changed = cfg != self.config or not self._last_costs
        self.config = cfg
        self.live = Live(cfg, BatchCosts.build(self.profile, cfg.sites, self.max_batch, self.max_tokens, self.overhead_ms),
                         self._scorer(), self._heads())
        self._last_costs = time.monotonic()
        self._costs_stale = False
        if changed:
            self.metrics.show_config(cfg.sites, cfg.thresholds, cfg.version)

    def _log_events(self) -> None:
        events = self.controller.events if self.controller is not None else ()
        new = []
        for e in reversed(events):
            if e is self._last_event:
                break
            new.append(e)
        if events:
            self._last_event = events[-1]
        for e in reversed(new):
            if e.kind != "no_change":
                log.info("controller: %s (batch %d, v%d): %s", e.kind, e.batch, e.version, e.detail)

    # ------------------------------------------------------------------------------ state
    def _refresh_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._stats.get("_at", 0.0) < 0.2:
            return
        stats: dict[str, Any] = {"_at": now, "reports": self.handled, "busy_ms_per_report":
                                 (self._busy_s * 1e3 / self.handled) if self.handled else 0.0,
                                 "overhead_ms": self.overhead_ms}
        if self.controller is not None:
            cs = self.controller.stats()
            stats["controller"] = {k: cs[k] for k in ("version", "window_inputs", "window_accuracy", "batches", "inputs",
                                                       "guard") if k in cs}
            stats["events"] = [{"batch": e.batch, "kind": e.kind, "detail": e.detail, "version": e.version}
                               for e in list(self.controller.events)[-10:]]
        model = getattr(self.policy, "model", None)
        if model is not None:  # the learned exit rule's evidence model
            scorer = self.live.scorer
            stats["evidence"] = {"version": model.version, "published": None if scorer is None else scorer.version,
                                 "buffered": model.written, "fitted_sites": int(np.count_nonzero(~np.isnan(model.weights[:, 0])))}
        self._stats = stats

    def stats(self) -> dict[str, Any]:
        return {k: v for k, v in self._stats.items() if not k.startswith("_")}

    def payload(self) -> dict[str, Any]:
        served = self.served
        return {
            "policy": self.options.policy,
            "model": {"name": served.name, "fingerprint": served.fingerprint, "num_sites": served.num_sites},
            "config": self.config.to_dict(),
            "profile": self.profile.to_dict(),
            "controller": self.controller.state() if self.controller is not None else None,
            **({"evidence": self.policy.evidence_state()} if hasattr(self.policy, "evidence_state") else {}),
            **({"heads": self.policy.heads_state()} if hasattr(self.policy, "heads_state") else {}),
        }

    def checkpoint(self) -> Path | None:
        if self.options.state_dir is None:
            return None
        path = save_state(self.options.state_dir, self.payload())
        self.last_checkpoint = time.time()
        return path
