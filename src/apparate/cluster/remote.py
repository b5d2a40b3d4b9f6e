"""A replica's policy: its feedback goes to the cluster's tuner, its Configs come from there.

The replica's `ControlLoop` runs as on a single server (metrics, the measured profile, pooling
small batches into controller-sized feedback), but its policy is this one: `feedback` hands the
pooled `Feedback` to a sender (the link to the tuner; it must not block) and returns the Config
in force. Configs arrive by `offer(config, seq)` from the link's thread, each numbered by the
tuner; one numbered at or below the one applied is ignored (and counted), so deliveries that
overtake each other never take a replica back to an older Config. The Config served carries the
tuner's number as its `version`, which is what /earlyexit and `apparate_config_version` show.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Callable

from apparate.core.controller import Config, Feedback
from apparate.policies.base import Policy


class RemotePolicy(Policy):
    name = "cluster"

    def __init__(self, config: Config, seq: int, send: Callable[[Feedback], None], adaptive: bool = True):
        self._config = replace(config, version=int(seq))
        self.seq = int(seq)
        self.adaptive = adaptive
        self.stale = 0  # Configs offered after a newer one had been applied
        self._send = send
        self._lock = threading.Lock()
        self.on_change: Callable[[], None] | None = None  # the control loop's nudge

    @property
    def config(self) -> Config:
        return self._config

    def feedback(self, fb: Feedback) -> Config:
        self._send(fb)
        return self._config

    def offer(self, config: Config, seq: int) -> bool:
        """Apply `config` if `seq` is newer than the one applied; True if it was."""
        with self._lock:
            if seq <= self.seq:
                self.stale += seq < self.seq
                return False
            self._config = replace(config, version=int(seq))
            self.seq = int(seq)
        if self.on_change is not None:
            self.on_change()
        return True

    def cost_sites(self) -> tuple[int, ...]:
        return self._config.sites
