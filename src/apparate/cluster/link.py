"""A replica's link to the tuner: feedback out, Configs in, both off the serving path.

Two daemon threads per replica:
* the sender wakes when pooled feedback is queued (`send`, called by the control thread, never
  blocks: a full queue drops the batch and counts it) or every `heartbeat_s`, and makes one call
  to the tuner with everything queued, the Config number held, the measured profile (when it
  changed) and the replica's metric families;
* the watcher keeps one `wait_config` long-poll open and offers each Config it returns to the
  replica's `RemotePolicy`, which applies only newer numbers.

A reply from a new tuner incarnation (Ray restarted it from its checkpoint), or one saying the
replica is unknown, makes the replica register again, reporting the number it holds. A failed
or timed-out call marks the tuner unreachable: the replica keeps serving its last Config, says
so in /earlyexit (`cluster.tuner.reachable`) and `apparate_tuner_reachable`, drops feedback it
cannot send (counted in `apparate_cluster_feedback_unsent_total`), and retries with backoff.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import ray

from apparate.core.controller import Config, Feedback

from . import NAMESPACE, TUNER_NAME
from .metrics import families
from .remote import RemotePolicy

log = logging.getLogger("apparate.cluster")


class TunerLink:
    def __init__(self, replica: str, name: str = TUNER_NAME, namespace: str = NAMESPACE,
                 heartbeat_s: float = 1.0, call_timeout_s: float = 10.0, profile_every_s: float = 2.0):
        self.replica = replica
        self.name, self.namespace = name, namespace
        self.heartbeat_s, self.call_timeout_s, self.profile_every_s = heartbeat_s, call_timeout_s, profile_every_s
        self.registry: Any = None  # the replica engine's metrics registry (`start`)
        self.reachable = False
        self.error: str | None = None
        self.unreachable_since: float | None = None
        self.incarnation: str | None = None
        self.registrations = 0
        self.sent_inputs = 0
        self.unsent_inputs = 0
        self.policy: RemotePolicy | None = None
        self.control: Any = None  # the replica's ControlLoop (its measured profile)
        self._actor: Any = None
        self._q: queue.Queue = queue.Queue(maxsize=256)
        self._stop = threading.Event()
        self._reg_lock = threading.Lock()
        self._profile_sent: tuple[Any, float] = (None, 0.0)
        self._threads: list[threading.Thread] = []
        self.g_reachable: Any = None
        self.c_unsent: Any = None

    # ------------------------------------------------------------------ calls
    def _tuner(self) -> Any:
        if self._actor is None:
            self._actor = ray.get_actor(self.name, namespace=self.namespace)
        return self._actor

    def _call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        try:
            ref = getattr(self._tuner(), method).remote(*args)
            out = ray.get(ref, timeout=timeout or self.call_timeout_s)
        except Exception as e:  # noqa: BLE001 - RayActorError, GetTimeoutError, ValueError (no such actor)...
            self._down(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            raise
        if not self.reachable:
            log.info("replica %s: the tuner answers again", self.replica)
        self.reachable, self.error, self.unreachable_since = True, None, None
        if self.g_reachable is not None:
            self.g_reachable.set(1)
        return out

    def _down(self, why: str) -> None:
        if self.reachable or self.unreachable_since is None:
            log.warning("replica %s: the tuner is unreachable (%s); serving the last Config", self.replica, why)
            self.unreachable_since = time.time()
        self.reachable, self.error = False, why
        if self.g_reachable is not None:
            self.g_reachable.set(0)
        self._actor = None  # look the name up again: the tuner may have been started anew

    def register(self) -> dict[str, Any]:
        """Register (or again); offer the tuner's Config to the policy, if there is one yet."""
        with self._reg_lock:
            held = self.policy.seq if self.policy is not None else 0
            cur = self._call("register", self.replica, held)
            self.incarnation = cur["incarnation"]
            self.registrations += 1
            self._offer(cur)
            return cur

    def _offer(self, cur: dict[str, Any]) -> None:
        if self.policy is not None:
            self.policy.offer(Config.from_dict(cur["config"]), int(cur["seq"]))

    def _check(self, reply: dict[str, Any]) -> None:
        if reply.get("incarnation") != self.incarnation or reply.get("registered") is False:
            log.info("replica %s: new tuner incarnation %s: registering again", self.replica, reply.get("incarnation"))
            self.register()

    # ------------------------------------------------------------------ threads
    def start(self, policy: RemotePolicy, control: Any, registry: Any) -> None:
        """Run the threads for this replica's policy, control loop and metrics registry."""
        from prometheus_client import Counter, Gauge

        self.policy, self.control, self.registry = policy, control, registry
        self.g_reachable = Gauge("apparate_tuner_reachable", "1 while the cluster's tuner answers this replica",
                                 registry=registry)
        self.g_reachable.set(int(self.reachable))
        self.c_unsent = Counter("apparate_cluster_feedback_unsent", "Inputs of feedback not delivered to the tuner",
                                registry=registry)
        for target, name in ((self._send_loop, "apparate-tuner-send"), (self._watch_loop, "apparate-tuner-watch")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, flush_timeout_s: float = 2.0) -> None:
        """Stop the threads; feedback still queued (a stopping replica's last batches) is sent
        once more, within `flush_timeout_s`, if the tuner answers."""
        self._stop.set()
        for t in self._threads:
            t.join(flush_timeout_s)
        items = []
        while not self._q.empty():
            items.append(self._q.get_nowait())
        if items and self.reachable and self.incarnation is not None:
            try:
                self._call("feedback", self.replica, self._message(items), timeout=flush_timeout_s)
                self.sent_inputs += sum(int(it["conf"].shape[0]) for it in items)
                return
            except Exception:  # noqa: BLE001 - counted below
                pass
        if items:
            self._unsent(items)

    def send(self, fb: Feedback) -> None:
        """Queue pooled feedback for the tuner (the control thread: never blocks)."""
        item = {"sites": fb.sites, "thresholds": fb.thresholds, "conf": fb.conf, "agree": fb.agree,
                "length": fb.length, "weight": fb.weight, "sent_at": time.time()}  # weight: early stop's
        try:
            self._q.put_nowait(item)
        except queue.Full:
            self._unsent([item])

    def _unsent(self, items: list[dict[str, Any]]) -> None:
        n = sum(int(it["conf"].shape[0]) for it in items)
        self.unsent_inputs += n
        if self.c_unsent is not None:
            self.c_unsent.inc(n)

    def _message(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        msg: dict[str, Any] = {"applied": self.policy.seq if self.policy else 0, "feedback": items,
                               "families": families(self.registry)}
        prof = getattr(self.control, "profile", None)
        last, at = self._profile_sent
        if prof is not None and prof is not last and time.monotonic() - at >= self.profile_every_s:
            msg["profile"] = prof.to_dict()
            self._profile_sent = (prof, time.monotonic())
        return msg

    def _send_loop(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            items: list[dict[str, Any]] = []
            try:
                items.append(self._q.get(timeout=self.heartbeat_s))
                while True:
                    items.append(self._q.get_nowait())
            except queue.Empty:
                pass
            try:
                if self.incarnation is None:
                    self.register()
                reply = self._call("feedback", self.replica, self._message(items))
                self.sent_inputs += sum(int(it["conf"].shape[0]) for it in items)
                self._check(reply)
                backoff = 0.5
            except Exception:  # noqa: BLE001 - unreachable: counted, retried after a pause
                if items:
                    self._unsent(items)
                self.incarnation = None  # register first when it answers again
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _watch_loop(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                if self.incarnation is None:
                    self.register()
                held = self.policy.seq if self.policy else 0
                cur = self._call("wait_config", held, 10.0, timeout=self.call_timeout_s + 10.0)
                if cur["incarnation"] != self.incarnation:
                    self._check(cur)
                else:
                    self._offer(cur)
                backoff = 0.5
            except Exception:  # noqa: BLE001
                self.incarnation = None
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def state(self) -> dict[str, Any]:
        p = self.policy
        return {"replica": self.replica, "config_seq": p.seq if p else None, "stale_configs_ignored": p.stale if p else 0,
                "tuner": {"reachable": self.reachable, "error": self.error, "unreachable_since": self.unreachable_since,
                          "incarnation": self.incarnation, "registrations": self.registrations},
                "feedback": {"sent_inputs": self.sent_inputs, "unsent_inputs": self.unsent_inputs,
                             "queued": self._q.qsize()}}
