"""Triton's model-repository extension: the index of what this server serves.

    POST /v2/repository/index          (HTTP; body optional: {"ready": true} lists ready models only)
    RepositoryIndex                    (gRPC)

A server serves one model, version 1: the index lists it with its state, READY while the engine
serves and UNAVAILABLE otherwise (starting, stopping, or failed), with the reason.
"""

from __future__ import annotations

from typing import Any


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
