"""Ramp answers reach the host without stopping the device: copies, events, one waiter thread.

On the CPU a ramp's logits are host memory already and the release callback runs in the hook
(`EarlyExitModel`): that direct path stays. On a CUDA device, reading a ramp's logits in the
hook (`.cpu()`, `.numpy()`) would block the engine thread until the device has caught up with
everything launched so far; the launch queue runs dry at every active ramp, and the rest of the
batch starts late by however long the host then takes to decide and release. Early release
would cost more than it saves.

`HostRelease.bind(callback)` gives the hook a callback that instead, for each ramp result,
launches a non-blocking copy of its logits into pinned host memory and records an event after
it, then returns at once: the engine thread goes on launching the rest of the model. A waiter
thread takes the ramps in order, waits on each one's event (the copy has landed), puts the host
copy in the result (`RampResult.logits`, so that its confidence and answer are read on the
host) and runs the callback there: the release happens while the device runs on.
`finish()` ends the batch: it records an event after the forward, waits until the waiter has
handled every ramp of the batch and that event has passed, and raises the first error a
callback raised, so that the executor falls back exactly as when a ramp fails in the hook.

Events are anything with `record()` and `synchronize()` (`torch.cuda.Event`'s protocol); the
factory is a parameter, so CPU tests drive this path with stand-ins that block until told to.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol


class DeviceEvent(Protocol):
    """What the waiter needs of an event (`torch.cuda.Event` has it)."""

    def record(self) -> None: ...

    def synchronize(self) -> None: ...


EventFactory = Callable[[], DeviceEvent]
Callback = Callable[[Any], None]


@dataclass
class RampTrace:
    """When one ramp's answers reached the host (perf_counter seconds), for `apparate bench gpu`."""

    site: int
    event: Any  # the event recorded after the copy (elapsed times, when it records them)
    launched: float  # the hook returned: copy and event queued
    ready: float  # the event passed: the waiter saw the copy land
    done: float  # the callback returned


@dataclass
class _Batch:
    """One forward's ramps, in launch order; the waiter's and `finish`'s shared state."""

    callback: Callback
    pending: int = 0  # ramps queued and not yet handled
    error: BaseException | None = None  # the first error of a callback (or of a wait)
    traces: list[RampTrace] = field(default_factory=list)
    idle: threading.Condition = field(default_factory=threading.Condition)


class HostRelease:
    """Per executor: pinned copies and events in the hook, callbacks on a waiter thread.

    One batch at a time (`bind`, the forward, `finish`), as the engine thread runs them. The
    waiter is started on first use and ends with `close()` (or with the process: a daemon)."""

    def __init__(self, device: Any, event: EventFactory | None = None, pin: bool | None = None,
                 trace: bool = False) -> None:
        import torch

        self.device = torch.device(device)
        if event is None:
            if self.device.type != "cuda":
                raise ValueError(f"HostRelease needs an event factory on {self.device} (events are CUDA's)")
            event = lambda: CudaEvent(self.device, trace)  # noqa: E731
        self._event = event
        self._pin = self.device.type == "cuda" if pin is None else pin
        self.trace = trace
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._batch: _Batch | None = None
        self.last_traces: list[RampTrace] = []  # the latest finished batch's, when tracing

    # -------------------------------------------------------------------- the engine thread
    def bind(self, callback: Callback) -> Callback:
        """Start a batch: the returned function is the hook's callback for its forward."""
        if self._batch is not None:
            raise RuntimeError("HostRelease: the previous batch was not finished")
        if self._thread is None:
            self._thread = threading.Thread(target=self._wait_loop, name="apparate-host-release", daemon=True)
            self._thread.start()
        batch = self._batch = _Batch(callback)

        def launch(result: Any) -> None:
            host = self._copy(result.logits)
            ev = self._event()
            ev.record()  # after the copy on the current stream: passing it means the copy landed
            with batch.idle:
                batch.pending += 1
            self._queue.put((batch, result, host, ev, time.perf_counter()))
        return launch

    def finish(self) -> None:
        """End the batch: every ramp handed to its callback, the device done with the forward.
        Raises the first error a callback raised (the batch's remaining ramps were skipped)."""
        batch, self._batch = self._batch, None
        if batch is None:
            return
        end = self._event()
        end.record()
        with batch.idle:
            while batch.pending:
                batch.idle.wait()
        end.synchronize()  # the final output is ready: what the executor reads next costs no wait
        if self.trace:
            self.last_traces = batch.traces
        if batch.error is not None:
            raise batch.error

    def abandon(self) -> None:
        """After a forward that raised: wait out the ramps it queued, keep none of their errors."""
        try:
            self.finish()
        except Exception:  # noqa: BLE001 - the forward's own error is the one reported
            pass

    def close(self) -> None:
        """Stop the waiter thread (after the current batch)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _copy(self, t: Any) -> Any:
        import torch

        if t.device.type == "cpu":  # a stand-in run (tests): a copy, so the waiter owns what it reads
            return t.detach().clone()
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=self._pin)
        host.copy_(t.detach(), non_blocking=True)
        return host

    # -------------------------------------------------------------------- the waiter thread
    def _wait_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch, result, host, ev, launched = item
            ready = done = launched
            try:
                if batch.error is None:  # after a failed callback the batch's other ramps are skipped
                    ev.synchronize()
                    ready = time.perf_counter()
                    result.logits = host  # scored on the host from here on (RampResult reads it lazily)
                    batch.callback(result)
                    done = time.perf_counter()
            except BaseException as e:  # noqa: BLE001 - handed to finish(), which the engine thread runs
                batch.error = e
            finally:
                if self.trace:
                    batch.traces.append(RampTrace(result.site, ev, launched, ready, done))
                with batch.idle:
                    batch.pending -= 1
                    batch.idle.notify_all()


class CudaEvent:
    """A `torch.cuda.Event` recorded on the current stream of the served device (not of whatever
    device happens to be current on the engine thread), where the model's kernels and the ramps'
    copies run. Timing only when traced: an event without it is cheaper to record and wait on."""

    def __init__(self, device: Any, timing: bool) -> None:
        import torch

        self.device = device
        self.event = torch.cuda.Event(enable_timing=timing)

    def record(self) -> None:
        import torch

        self.event.record(torch.cuda.current_stream(self.device))

    def synchronize(self) -> None:
        self.event.synchronize()

    def query(self) -> bool:
        return bool(self.event.query())


def host_release_for(device: Any, trace: bool = False) -> HostRelease | None:
    """A `HostRelease` for a CUDA device; None on the CPU, where the hook releases directly."""
    import torch

    dev = torch.device(device)
    return HostRelease(dev, trace=trace) if dev.type == "cuda" else None
