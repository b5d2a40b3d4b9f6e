"""Triton's model-repository extension: the index of what this server serves, and its load verb.

    POST /v2/repository/index               (HTTP; body optional: {"ready": true} lists ready models only)
    RepositoryIndex                         (gRPC)
    POST /v2/repository/models/NAME/load    (HTTP; {"parameters": {"bundle": PATH}}; --allow-load)
    RepositoryModelLoad                     (gRPC; the same parameters)

A server serves one model, version 1: the index lists it with its state, READY while the engine
serves and UNAVAILABLE otherwise (starting, stopping, or failed), with the reason. A load swaps in
a re-prepared bundle of the same model between two batches (`serve.swap`).
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("apparate.serve")


def state(engine: Any) -> tuple[str, str]:
    """(state, reason) of the served model, in Triton's words."""
    if engine.ready and engine.running:
        return "READY", ""
    failed = getattr(engine, "_failed", None)
    if failed is not None:
        return "UNAVAILABLE", f"the engine failed: {type(failed).__name__}"
    return "UNAVAILABLE", "not serving (starting or stopping)"


def index(engine: Any, ready_only: bool = False) -> list[dict[str, str]]:
    """The repository index: one row per model (here, the one served)."""
    st, reason = state(engine)
    rows = [{"name": engine.served.name, "version": "1", "state": st, "reason": reason}]
    return [r for r in rows if r["state"] == "READY"] if ready_only else rows


class Repository:
    """Triton's load verb for the served model: `load(name, bundle)` swaps in a re-prepared bundle
    of the same model (`Engine.swap`); a bundle for another model is refused before it is loaded.

    `build(path)` makes the ServedModel of a bundle as the server made its first one (same name,
    codec limits, data directory)."""

    def __init__(self, engine: Any, build: Callable[[str], Any]):
        self.engine = engine
        self.build = build
        self._lock = threading.Lock()  # one load at a time
        self.loads = 0

    def load(self, name: str, bundle: str | None) -> dict[str, Any]:
        served = self.engine.served
        if name != served.name:
            raise LookupError(f"unknown model {name!r}; this server serves {served.name!r}")
        if not bundle:
            raise ValueError('say which bundle to load: parameters {"bundle": PATH} (or a config JSON '
                             'string with "bundle")')
        manifest = Path(bundle) / "manifest.json"
        if not manifest.is_file():
            raise ValueError(f"no bundle at {bundle} (no manifest.json)")
        try:
            meta = json.loads(manifest.read_text())
            fingerprint = str(meta["model"]["fingerprint"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{manifest} is not a bundle manifest ({type(e).__name__}: {e})") from None
        if fingerprint != served.fingerprint:
            what = meta.get("workload") or meta.get("model", {}).get("workload") or "another model"
            raise ValueError(f"bundle {bundle} was prepared for {what} (weights fingerprint {fingerprint[:12]}), "
                             f"not for the served {served.name!r} ({served.fingerprint[:12]}): serve it with its own "
                             "`apparate serve`")
        with self._lock:
            new = self.build(bundle)
            if new.num_sites != served.num_sites or new.kind != served.kind:
                raise ValueError(f"bundle {bundle} has {new.num_sites} {new.kind} sites; the served model has "
                                 f"{served.num_sites} {served.kind} ones")
            self.engine.swap(new)
            self.loads += 1
        log.info("loaded bundle %s into %s without a restart (load %d): ramps %s", bundle, name, self.loads,
                 list(self.engine.live.config.sites))
        return {"bundle": str(bundle), "loads": self.loads}


def load_parameters(params: Any) -> str | None:
    """The bundle path a load request names: `parameters.bundle`, or `parameters.config` as a JSON
    object with "bundle" (what `tritonclient`'s `load_model(name, config=...)` sends)."""
    if not isinstance(params, dict):
        raise ValueError("'parameters' must be an object")
    bundle = params.get("bundle")
    if bundle is None and params.get("config") is not None:
        try:
            config = json.loads(params["config"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"parameters.config is not JSON: {e}") from None
        bundle = config.get("bundle") if isinstance(config, dict) else None
    if bundle is not None and not isinstance(bundle, str):
        raise ValueError("the bundle must be a path (a string)")
    return bundle
