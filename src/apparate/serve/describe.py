"""The engine's live state as `GET /v2/models/NAME/earlyexit` shows it."""

from __future__ import annotations

import time
from typing import Any

from .early_stop import stop_state


def describe(engine: Any) -> dict[str, Any]:
    """Ramps, thresholds, accuracy, exit rates, admission, profile and control state, now."""
    live = engine.live
    cfg = live.config
    names = [s.name for s in engine.served.ee.sites]
    stats = engine.metrics.snapshot()
    prof = engine.control.profile
    mb = engine.options.batching.max_batch
    return {
        "model": engine.served.name,
        "policy": engine.control.options.policy,
        "config": {"version": cfg.version, "sites": list(cfg.sites), "site_names": [names[s] for s in cfg.sites],
                   "thresholds": list(cfg.thresholds)},
        "num_sites": engine.served.num_sites,
        **{k: v for k, v in stats.items() if k != "early_stop"},
        "queue_depth": len(engine.queue),
        "admission": {"shed": engine.admission.shed, "slowdown": round(engine.slowdown, 3), "margin": round(engine.margin, 3), "predicted_wait_ms": round(max(engine.admission.finish(time.perf_counter(), len(engine.queue), None)
                                                                         - time.perf_counter(), 0.0) * 1e3, 3)},
        "batches": engine.batches,
        "early_stop": {**stop_state(engine), **stats.get("early_stop", {})},
        "slo_ms": engine.options.slo_ms,
        "batching": {"kind": engine.options.batching.kind, "max_batch": mb, "shed": engine.options.batching.shed},
        "profile": {"vanilla_ms_batch_1": prof.vanilla(1), f"vanilla_ms_batch_{mb}": prof.vanilla(mb),
                    "predicted_batch_ms_max": live.costs.batch_ms(mb, getattr(engine.served.codec, "max_tokens", 1))},
        "control": engine.control.stats(),
        **({"scorer_version": live.scorer.version} if live.scorer is not None else {}),
        # heads that keep learning: the version the model's ramps hold, and where heads have changed
        **({"heads": {"version": live.heads.version, "changed_sites": sorted(live.heads.heads),
                      "swaps": int(getattr(engine.control.policy, "swaps", 0))}} if live.heads is not None else {}),
        "restored": engine.control.restored,
        "last_checkpoint": engine.control.last_checkpoint,
    }
