"""The cluster's tuner, without Ray: one controller fed by every replica's feedback.

`TunerCore` owns a serving `ControlLoop` (the one `apparate serve` runs, without its thread), so
placement, restore from a `--state-dir` checkpoint, the controller and its events are the same
code as on one server; replicas' feedback reaches `loop.policy.feedback` directly, in the order
it arrives, pooled into one window across replicas. Each replica's measured profile, sent with
its heartbeats, becomes the tuner's profile.

Configs are numbered by the tuner (`seq`), not by the controller: a new number whenever the
active ramps or thresholds change. Replicas apply a number only if it is above the one they
hold (`RemotePolicy.offer`). A restored tuner continues from its checkpoint's number; a replica
that re-registers holding a number at or above the tuner's (issued by the lost incarnation after
its last checkpoint) moves the numbering past it, and the tuner's Config is issued again under
the new number, so every replica converges on the tuner's Config.

Checkpoints are `--state-dir` states (`serve/state.py`) with one extra field, `cluster`
({"seq": ...}); a single server's state can seed a tuner and a tuner's a single server.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

from apparate.core.controller import Config, Feedback
from apparate.core.profile import LatencyProfile
from apparate.core.settings import Settings
from apparate.serve.control import ControlLoop, ControlOptions
from apparate.serve.state import StateError, read_state, save_state

from .metrics import TunerMetrics

log = logging.getLogger("apparate.cluster")
ALIVE_S = 30.0  # a replica heard from within this long counts as alive
FORGET_S = 120.0  # a replica silent this long has its metrics dropped from /metrics


@dataclass(frozen=True)
class ModelInfo:
    """What the control loop needs of the served model (no weights: the tuner runs no model)."""

    name: str
    kind: str
    fingerprint: str
    num_sites: int
    recording: Any = None


@dataclass(frozen=True)
class TunerSpec:
    model: ModelInfo
    profile: LatencyProfile
    control: ControlOptions
    max_batch: int = 16

    @classmethod
    def from_bundle(cls, path: str, control: ControlOptions, max_batch: int = 16, name: str | None = None,
                    data_dir: str | None = None, settings: Callable[[str], Settings] | None = None) -> "TunerSpec":
        """From a bundle read without its model (profile, recording, manifest): what the tuner
        actor builds for itself, so that Ray restarts it from a small, inlined argument."""
        from apparate.zoo.bundles import load_bundle

        b = load_bundle(path, data_dir=data_dir, load_model=False)
        m = b.manifest
        name = name or m.get("workload") or m.get("model", {}).get("workload") or b.path.name
        info = ModelInfo(str(name), b.kind, str(m.get("model", {}).get("fingerprint", "")), b.num_sites, b.recording)
        chosen = settings(b.kind) if settings is not None else control.settings or Settings.for_kind(b.kind)
        return cls(info, b.profile, replace(control, settings=chosen, remote=None), max_batch)

    @classmethod
    def from_options(cls, opts: Any) -> "TunerSpec":
        """From `ServeOptions` (`apparate serve --ray`)."""
        co = ControlOptions(policy=opts.policy, state_dir=opts.state_dir, checkpoint_every_s=opts.checkpoint_every_s,
                            feedback_min_inputs=opts.max_batch)
        return cls.from_bundle(opts.bundle, co, opts.max_batch, opts.model_name, opts.data_dir, opts.settings)


class TunerLoop(ControlLoop):
    """The serving control loop run without its thread: the tuner hands it each replica's
    feedback itself and takes the Config the policy returns."""

    def adopt(self, cfg: Config) -> None:
        self._log_events()
        if cfg != self.config:
            self._publish(cfg)
        self._refresh_stats(force=True)


@dataclass
class ReplicaState:
    registrations: int = 0
    applied: int = 0  # Config number the replica last reported holding
    inputs: int = 0  # inputs of feedback received
    lag_s: float | None = None  # the latest feedback's age when handled
    last_seen: float = field(default_factory=time.time)


class TunerCore:
    def __init__(self, spec: TunerSpec, incarnation: str = ""):
        self.spec = spec
        self.incarnation = incarnation or f"{time.time_ns():x}"
        self.metrics = TunerMetrics()
        self.loop = TunerLoop(spec.model, replace(spec.control, remote=None), self.metrics, spec.profile,
                                spec.max_batch)
        self.seq = 1
        if self.loop.restored.get("from") is not None:
            self.seq = self._saved_seq()
        self.replicas: dict[str, ReplicaState] = {}
        self.last_checkpoint: float | None = None
        self._next_ckpt = time.monotonic() + spec.control.checkpoint_every_s
        self._show()

    def _saved_seq(self) -> int:
        try:
            st = read_state(self.spec.control.state_dir)  # type: ignore[arg-type]
        except StateError:
            return 1
        if st is None:
            return 1
        saved = st.raw.get("cluster", {}).get("seq") if isinstance(st.raw.get("cluster"), dict) else None
        return int(saved) if isinstance(saved, int) and saved > 0 else max(int(st.config.version), 1)

    @property
    def adaptive(self) -> bool:
        return bool(self.loop.policy.adaptive)

    # ------------------------------------------------------------------ replicas
    def current(self) -> dict[str, Any]:
        """The Config replicas should serve, under its number."""
        cfg = self.loop.config
        return {"incarnation": self.incarnation, "seq": self.seq,
                "config": Config(cfg.sites, cfg.thresholds, self.seq).to_dict(), "adaptive": self.adaptive}

    def register(self, replica: str, applied: int = 0) -> dict[str, Any]:
        r = self.replicas.setdefault(replica, ReplicaState())
        r.registrations += 1
        r.applied, r.last_seen = int(applied), time.time()
        self.metrics.registrations.inc()
        if applied >= self.seq:  # issued by a lost incarnation: number past it (see the module doc)
            self.seq = int(applied) + 1
        log.info("replica %s registered (holds Config %d; the tuner's is %d)", replica, applied, self.seq)
        self._show()
        return self.current()

    def feedback(self, replica: str, msg: dict[str, Any]) -> dict[str, Any]:
        """A replica's heartbeat: its applied Config number, optionally pooled feedback, its
        measured profile and its metric families. Returns the tuner's incarnation and number."""
        now = time.time()
        r = self.replicas.get(replica)
        if r is None:  # it registered with a previous incarnation: it will re-register on this reply
            return {"incarnation": self.incarnation, "seq": self.seq, "registered": False}
        r.last_seen, r.applied = now, int(msg.get("applied", r.applied))
        if msg.get("families") is not None:
            self.metrics.replica_families.latest[replica] = msg["families"]
        if msg.get("profile") is not None:
            try:
                self.loop.profile = LatencyProfile.from_dict(msg["profile"])
            except (KeyError, TypeError, ValueError) as e:
                log.warning("replica %s sent an unusable profile: %s", replica, e)
                self.metrics.error("profile")
        for fb in msg.get("feedback") or ():
            self._observe(replica, r, fb, now)
        self._show()
        self.maybe_checkpoint()
        return {"incarnation": self.incarnation, "seq": self.seq, "registered": True}

    def _observe(self, replica: str, r: ReplicaState, fb: dict[str, Any], now: float) -> None:
        n = int(np.asarray(fb["conf"]).shape[0])
        r.inputs += n
        r.lag_s = max(now - float(fb["sent_at"]), 0.0)
        self.metrics.inputs.labels(replica).inc(n)
        self.metrics.lag.labels(replica).set(r.lag_s)
        if not self.adaptive:
            return
        try:
            feedback = Feedback(tuple(fb["sites"]), tuple(fb["thresholds"]), fb["conf"], fb["agree"], fb.get("length"),
                                weight=fb.get("weight"))  # a replica's early stop weights its sampled rows
        except (KeyError, TypeError, ValueError) as e:
            log.warning("replica %s sent unusable feedback: %s", replica, e)
            self.metrics.error("feedback")
            return
        before = self.loop.config
        ctl = self.loop.controller
        if ctl is not None:
            ctl.profile = self.loop.profile
        try:
            cfg = self.loop.policy.feedback(feedback)
        except Exception:  # noqa: BLE001 - one bad batch must not take the cluster's tuner down
            log.exception("feedback handling failed")
            self.metrics.error("feedback")
            return
        self.loop.adopt(cfg)
        if (cfg.sites, cfg.thresholds) != (before.sites, before.thresholds):
            self.seq += 1

    # ------------------------------------------------------------------ state
    def _show(self) -> None:
        m, now = self.metrics, time.time()
        m.version.set(self.seq)
        ctl = self.loop.stats().get("controller")
        if ctl is not None:
            m.window_accuracy.set(ctl["window_accuracy"])
            m.window_inputs.set(ctl["window_inputs"])
        m.replicas.set(sum(now - r.last_seen < ALIVE_S for r in self.replicas.values()))
        for rid, r in self.replicas.items():
            if now - r.last_seen > FORGET_S:
                m.replica_families.forget(rid)

    def state(self) -> dict[str, Any]:
        now = time.time()
        return {
            "model": self.spec.model.name, "incarnation": self.incarnation, "seq": self.seq,
            "config": self.current()["config"],
            "policy": self.loop.options.policy, "control": self.loop.stats(), "restored": self.loop.restored,
            "last_checkpoint": self.last_checkpoint,
            "replicas": {rid: {"registrations": r.registrations, "applied": r.applied, "inputs": r.inputs,
                               "lag_s": r.lag_s, "seen_s_ago": round(now - r.last_seen, 3),
                               "alive": now - r.last_seen < ALIVE_S}
                         for rid, r in self.replicas.items()},
        }

    def checkpoint(self) -> str | None:
        d = self.spec.control.state_dir
        if d is None:
            return None
        path = save_state(d, {**self.loop.payload(), "cluster": {"seq": self.seq}})
        self.last_checkpoint = time.time()
        self._next_ckpt = time.monotonic() + self.spec.control.checkpoint_every_s
        return str(path)

    def maybe_checkpoint(self) -> None:
        if self.spec.control.state_dir is not None and time.monotonic() >= self._next_ckpt:
            try:
                self.checkpoint()
            except OSError:
                log.exception("checkpoint failed")
                self.metrics.error("checkpoint")
