"""Which exited inputs still run to the end when early stop saves their compute.

With early stop an input released at a ramp while work waits leaves its batch, and its final
answer, the controller's feedback, is never computed. A share of them runs on anyway; each such
row then stands for 1/share inputs (`Feedback.weight`), which keeps every estimate of the
controller unbiased (Horvitz-Thompson) as long as the share is fixed before the input's coin.

A small share is cheap but sees little: at 5% a rise from 1% to 2% wrong among the exits shows up
as one wrong sampled answer in some 1,000 exits. So the share rises to 1 (every exited input runs
on, full feedback) for `alarm` inputs when there is reason to look:
* a sampled early answer proved wrong;
* the share of inputs released early moved away from its running level by more than `shift_z`
  standard errors (the inputs changed: the thresholds' accuracy may have changed with them);
* optionally (`Settings.stop_alarm_bolder`), the configuration became bolder.
Each uses only inputs already served, so the weights stay exact. The same object decides
in replay (`policies.base.AdaptivePolicy`) and live (the executor's early stop).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Sequence

import numpy as np

from .profile import LatencyProfile


class FeedbackSampler:
    def __init__(self, floor: float, alarm: int = 256, shift_z: float = 4.0, fast: int = 64, slow: int = 1024):
        if not 0 < floor <= 1:
            raise ValueError(f"the sampled share must be in (0, 1], got {floor}")
        if alarm < 0 or shift_z <= 0 or not 1 <= fast < slow:
            raise ValueError("need alarm >= 0, shift_z > 0 and 1 <= fast < slow")
        self.floor = 1.0 / max(1, round(1.0 / floor))  # a whole 1/share: whole weights
        self.alarm, self.shift_z, self.fast_n, self.slow_n = int(alarm), float(shift_z), fast, slow
        self.left = 0  # inputs that still run to the end after the last alarm
        self.fast: float | None = None  # running shares of inputs released early
        self.slow: float | None = None
        self.alarms = {"wrong": 0, "shift": 0, "bolder": 0}

    @property
    def share(self) -> float:
        """The probability that an input released early while work waits runs to the end."""
        return 1.0 if self.left > 0 else self.floor

    def update(self, early: np.ndarray, sampled_wrong: bool, bolder: bool = False) -> None:
        """After a batch: `early` [n] which inputs a ramp released; `sampled_wrong` whether an
        early answer that ran to the end only because it was sampled disagreed with the final."""
        n = int(early.size)
        self.left = max(self.left - n, 0)
        if sampled_wrong:
            self._raise("wrong")
        if bolder:
            self._raise("bolder")
        if not n:
            return
        x = float(np.count_nonzero(early)) / n
        if self.slow is None:
            self.fast = self.slow = x
            return
        self.fast += (1 - (1 - 1 / self.fast_n) ** n) * (x - self.fast)
        self.slow += (1 - (1 - 1 / self.slow_n) ** n) * (x - self.slow)
        se = np.sqrt(max(self.slow * (1 - self.slow), 0.01) / self.fast_n)
        if abs(self.fast - self.slow) > self.shift_z * se:
            self._raise("shift")
            self.slow = self.fast  # the new level is the reference from now on

    def _raise(self, why: str) -> None:
        if self.alarm:
            self.left = self.alarm
            self.alarms[why] += 1


def bolder_than(sites: Sequence[int], thresholds: Sequence[float], config: Any) -> bool:
    """Does `config` (a Config) release more than `sites` with `thresholds` would: a ramp added,
    or a threshold raised?"""
    old = dict(zip(sites, thresholds))
    return any(t > old.get(s, 0.0) + 1e-12 for s, t in zip(config.sites, config.thresholds))


def leave_sites(profile: LatencyProfile, min_rest: float) -> frozenset[int]:
    """The sites at which an input released while work waits may leave its batch: those after
    which at least `min_rest` of a batch-1 pass remains (`Settings.stop_min_rest`). One answer for
    replay and live: both ask it of the same profile."""
    tab = profile.table(1.0, range(profile.num_sites))
    rest = 1.0 - np.asarray(tab.site_ms) / float(tab.vanilla_ms)
    return frozenset(int(s) for s in np.flatnonzero(rest >= min_rest - 1e-12))


class FeedbackPool:
    """Inputs that left their batch while work waited, kept to run again for their feedback.

    Early stop saves the rest of a pass while requests wait; most waits are short, and the worker
    is idle again soon after (at half of capacity about half the time). An input that left joins
    this pool while it has room, and runs again, from the start (in replay, optionally from where
    it left: `Settings.stop_pool_resume`), once nothing is queued: its final
    answer arrives late but costs no request any time. Such a batch is abandoned at the first ramp
    after which a request has arrived (its inputs go back to the pool), so a request waits at most
    one stretch between ramps for it. An input older than `max_age` inputs served runs even while
    work waits, so every input that joins the pool is eventually observed: its probability of
    completing is 1 and its feedback row weighs 1, exactly. Inputs that find the pool full leave
    for good unless the sampler's coin keeps them (weight 1/share), as without the pool.
    The same object decides in replay (`replay.simulator`) and live (the engine).
    """

    def __init__(self, cap: int, max_age: int):
        if cap < 0 or max_age < 1:
            raise ValueError(f"need cap >= 0 and max_age >= 1, got {cap} and {max_age}")
        self.cap, self.max_age = int(cap), int(max_age)
        self._items: deque[tuple[int, Any]] = deque()  # (inputs served when it joined, item), oldest first
        self.served = 0  # inputs served so far (the pool's clock)
        self.counts = {"joined": 0, "idle": 0, "forced": 0, "abandoned": 0, "failed": 0}

    @classmethod
    def of(cls, settings: Any) -> "FeedbackPool | None":
        """The pool `settings` (a `Settings`, or None for the defaults) ask for: None when
        `stop_pool` is 0 (off). One reading of the settings for replay and live."""
        cap = int(getattr(settings, "stop_pool", 0))
        return cls(cap, int(getattr(settings, "stop_pool_age", 512))) if cap else None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def room(self) -> int:
        return self.cap - len(self._items)

    def add(self, items: Sequence[Any]) -> None:
        if len(items) > self.room:
            raise ValueError(f"{len(items)} inputs for a pool with room for {self.room}")
        self._items.extend((self.served, it) for it in items)
        self.counts["joined"] += len(items)

    def overdue(self) -> bool:
        """Must the oldest input run now, even while work waits?"""
        return bool(self._items) and self.served - self._items[0][0] >= self.max_age

    def turn(self, queued: bool, k: int, same: Callable[[Any, Any], bool] | None = None
             ) -> tuple[list[tuple[int, Any]], bool] | None:
        """The pool's turn at a free worker: up to `k` of the oldest inputs to run again (`same`: as
        in `take`) and whether they are overdue (they run even while work waits); None when the pool
        is empty, or work is `queued` and nothing is overdue. Give them back to `done` or `put_back`."""
        if not self._items:
            return None
        forced = self.overdue()
        if queued and not forced:
            return None
        return self.take(k, same), forced

    def done(self, entries: list[tuple[int, Any]], forced: bool) -> None:
        """Inputs from `turn` that ran again to the end."""
        self.counts["forced" if forced else "idle"] += len(entries)

    def take(self, k: int, same: Callable[[Any, Any], bool] | None = None) -> list[tuple[int, Any]]:
        """Up to `k` of the oldest inputs (with `same`: only those that `same(oldest, item)` accepts,
        e.g. served with the same ramps, so that they can run as one batch)."""
        out: list[tuple[int, Any]] = []
        rest: list[tuple[int, Any]] = []
        while self._items and len(out) < k:
            entry = self._items.popleft()
            if same is None or not out or same(out[0][1], entry[1]):
                out.append(entry)
            else:
                rest.append(entry)
        self._items.extendleft(reversed(rest))
        return out

    def clear(self) -> None:
        self._items.clear()

    def put_back(self, entries: list[tuple[int, Any]]) -> None:
        """An abandoned batch's inputs, back at the front with their age."""
        self._items.extendleft(reversed(entries))
        self.counts["abandoned"] += 1
