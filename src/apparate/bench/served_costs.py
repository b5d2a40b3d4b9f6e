"""Ramp costs as a server pays them, for a replay (`bench compare --ramp-costs served`).

A bundle's profile times each ramp's head alone on a cached activation. A server pays more: the
hook, the scoring, and for the learned exit rule its features and score (on images also the
pooled features and their movement), on the caches its backbone stage just evicted. A server
measures that at start (`serve/calibrate.py`) and judges its ramp budget on it; a replay that
charges the bundle's costs lets a policy run ramps a server at the same budget could not. This
module builds the server's executor for a bundle and returns the bundle's profile with the ramp
costs that calibration measures on this machine, for the hook a policy runs.
"""

from __future__ import annotations

from typing import Any

from apparate.core.profile import LatencyProfile
from apparate.core.settings import Settings

HOOKS = ("plain", "learned")


def hook_of(policy: str) -> str:
    """The hook a replayed policy runs when served: the learned exit rule's, or the plain one."""
    return "learned" if policy == "apparate-learned" else "plain"


def served_ramp_costs(bundle: Any, hook: str, max_batch: int, settings: Settings,
                      threads: int | None = None) -> LatencyProfile:
    """`bundle`'s profile with every ramp's cost as a server calibrates it here for `hook`
    ('plain' or 'learned', the latter with `settings.evidence_movement`), as a server's start-up
    calibration times them (`calibration_sizes`, `fill_between`). Backbone times are the bundle's."""
    import torch

    from apparate.serve.calibrate import calibrate_ramps, calibration_sizes
    from apparate.serve.executor import Executor
    from apparate.serve.model_io import ServedModel

    if hook not in HOOKS:
        raise ValueError(f"hook must be one of {HOOKS}, got {hook!r}")
    if threads is not None:
        torch.set_num_threads(threads)
    served = ServedModel.from_bundle(bundle)
    ex = Executor(served, lambda pairs: None, movement=settings.evidence_movement)
    try:
        return calibrate_ramps(ex, served.profile, calibration_sizes(served.profile, max_batch),
                               learned=hook == "learned")
    finally:
        ex.close()
        served.ee.remove_hooks()
