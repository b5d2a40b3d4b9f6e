"""Checkpoints of the serving state, written atomically.

One JSON file per state directory, `serve-state.json`:

    {"format": "apparate.serve-state/1", "policy": ..., "model": {"name", "fingerprint", "sites"},
     "saved_at": unix time, "config": Config.to_dict(), "profile": LatencyProfile.to_dict(),
     "controller": Controller.state() or null}

`controller` is exactly `Controller.state()` (what `Controller.dumps()` writes) for the
apparate policy; the profile and config are kept for every policy so that a restarted vanilla
or static server also starts from this machine's measured costs. Writes go to a temporary file
in the same directory, are flushed to disk, then renamed over the old file: a crash leaves the
previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

FORMAT = "apparate.serve-state/1"
FILE = "serve-state.json"


def state_path(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir) / FILE


def save_state(state_dir: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    d = Path(state_dir)
    d.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"format": FORMAT, "saved_at": time.time(), **payload})
    fd, tmp = tempfile.mkstemp(prefix=f".{FILE}.", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, d / FILE)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return d / FILE


def load_state(state_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The saved state, or None when there is none. A damaged file raises ValueError."""
    p = state_path(state_dir)
    if not p.exists():
        return None
    try:
        data = json.loads(p.read_text())
    except ValueError as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{p} is not a serving state of format {FORMAT!r}")
    return data
