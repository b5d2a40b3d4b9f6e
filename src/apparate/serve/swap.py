"""Swapping in a re-prepared bundle of the served model without a restart (Triton's load verb).

The new bundle's executor and control loop are built on the caller's thread (ramp costs
calibrated, ramps placed on its bootstrap recording, a warm-up) while the old ones go on
serving; then the engine thread changes over between two batches: the batch running finishes
on the old ramps, everything queued runs on the new ones, and no request is dropped or answered
twice. The old control loop then handles its last reports and stops; the new one starts afresh
(a checkpoint of the old ramps does not fit the new ones) and owns the state directory from then.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Any

from .startup import warm_up_sizes


@dataclass(eq=False)
class ChangeOver:
    served: Any
    executor: Any
    control: Any
    done: threading.Event = field(default_factory=threading.Event)
    old: tuple[Any, Any] | None = None  # (control loop, executor) replaced

    def apply(self, engine: Any) -> None:
        """On the engine thread, between two batches (or on the caller's when not serving)."""
        engine._swap = None
        self.old = (engine.control, engine.executor)
        engine._hand_over()  # the old bundle's last report goes to its own control loop
        engine.served, engine.executor, engine.control = self.served, self.executor, self.control
        self.executor.on_model_start = engine._hand_over
        engine.admission.idle_costs = self.control.live.costs
        if engine.early_stop is not None:  # the new bundle's sites where leaving pays
            engine.early_stop.sites = engine.leave_sites()
            if engine.early_stop.pool is not None:  # inputs of the old bundle's configurations
                engine.early_stop.pool.clear()
        if engine.running:
            self.control.start()
        self.done.set()


def change_over(engine: Any, served: Any, timeout: float = 120.0) -> None:
    """Serve `served` from the next batch on; returns once the engine has changed over."""
    import torch

    opts = engine._control_opts
    engine._control_opts = replace(opts, restore=False)  # fresh ramps: no restoring the old ones' state
    try:
        executor, control = engine._build(served)
    finally:
        engine._control_opts = opts
    if engine.running:
        with torch.inference_mode():
            mb = engine.options.batching.max_batch
            text = getattr(served.codec, "max_tokens", None) is not None
            executor.warm_up(warm_up_sizes(mb, text), control.live.config.sites)
    swap = ChangeOver(served, executor, control)
    engine._swap = swap
    engine.queue.wake()  # an idle engine thread changes over at once
    if engine.running:
        if not swap.done.wait(timeout):
            raise TimeoutError(f"the engine did not change over within {timeout:g} s")
    else:
        swap.apply(engine)
    old_control, old_executor = swap.old  # type: ignore[misc]
    old_control.stop()  # its last reports handled, its state checkpointed once more
    old_executor.close()
    if engine.running:
        control.checkpoint()  # the state directory now holds the new ramps' state
