"""One thread that decodes every request of the generate endpoint, several sequences per step.

Requests wait in a queue; between decode steps the thread takes as many as there are free slots
(`max_batch` in all), prefills them together and adds them to the running batch
(`batch_decode.BatchDecoder`: continuous batching, a finished sequence frees its slot at once).
Each sequence is decoded under the controller's Config of the moment it joined; when it leaves,
its tokens feed the controller (`TokenTuner.observe`), so a Config change applies to the
sequences that join after it.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .batch_decode import BatchDecoder, Slot
from .control import TokenTuner
from .decode import Decoder, Sampling, Token


@dataclass
class Request:
    """One sequence to decode, and where its tokens and its end go (called on the decode thread)."""

    ids: Sequence[int]
    max_tokens: int
    sampling: Sampling | None
    on_emit: Callable[[Token], None]
    on_done: Callable[[Decoder, Any], None]  # (decoder, the Config it was decoded under)
    on_error: Callable[[str], None]


class Scheduler:
    """The decode thread: `submit` requests; `pause`/`resume` hold it between steps."""

    def __init__(self, tuner: TokenTuner, max_batch: int = 8):
        self.tuner = tuner
        self.batch = BatchDecoder(tuner.lm, max_batch)
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.largest = 0  # the most sequences one step has carried
        self.steps = 0
        self._go = threading.Event()
        self._go.set()
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by submit and stop
        self._thread: threading.Thread | None = None

    def start(self) -> "Scheduler":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="apparate-generate", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._go.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, req: Request) -> None:
        self.waiting.put(req)
        self._wake.set()

    def pause(self) -> None:
        """Hold the thread before its next step (requests keep queueing)."""
        self._go.clear()

    def resume(self) -> None:
        self._go.set()

    def stats(self) -> dict[str, int]:
        return {"max_batch": self.batch.max_batch, "running": len(self.batch.slots), "waiting": self.waiting.qsize(),
                "steps": self.steps, "largest_batch": self.largest}

    def _run(self) -> None:
        while not self._stop.is_set():
            self._go.wait()
            if self._stop.is_set():
                break
            if not self.batch.slots and self.waiting.empty():
                self._wake.wait()  # idle: until a request (or stop) arrives, then check `pause` again
                self._wake.clear()
                continue
            new: list[Request] = []
            while len(new) < self.batch.free:
                try:
                    new.append(self.waiting.get_nowait())
                except queue.Empty:
                    break
            if new:
                slots = []
                for r in new:
                    dec, cfg = self.tuner.decoder(r.sampling)
                    slots.append(Slot(dec, r.max_tokens, self.tuner.lm.eos_ids, r.on_emit, (r, cfg)))
                try:
                    self.batch.join(slots, [r.ids for r in new])
                except Exception as e:  # reported to these clients; the running batch goes on
                    for r in new:
                        r.on_error(repr(e))
            if not self.batch.slots:
                continue
            self.largest = max(self.largest, len(self.batch.slots))
            try:
                left = self.batch.step()
            except Exception as e:  # a failed step leaves its sequences' state unknown: end them all
                for s in self.batch.slots:
                    s.tag[0].on_error(repr(e))
                self.batch.slots = []
                continue
            self.steps += 1
            for s in left:
                req, cfg = s.tag
                try:
                    self.tuner.observe(s.dec, cfg)
                    req.on_done(s.dec, cfg)
                except Exception as e:
                    req.on_error(repr(e))
