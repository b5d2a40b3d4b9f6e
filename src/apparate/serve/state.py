"""Checkpoints of the serving state, written atomically, read back field by field.

One JSON file per state directory, `serve-state.json`:

    {"format": "apparate.serve-state/1", "policy": ..., "model": {"name", "fingerprint", "num_sites"},
     "saved_at": unix time, "config": Config.to_dict(), "profile": LatencyProfile.to_dict(),
     "controller": Controller.state() or null}

`controller` is exactly `Controller.state()` (what `Controller.dumps()` writes) for the
apparate policies; `apparate-learned` adds `evidence` (its evidence model's fit: version and
per-site weights, null for an unfitted site; checked when restored,
`LearnedPolicy.restore_evidence`). The profile and config are kept for every policy so that a
restarted vanilla or static server also starts from this machine's measured costs. Writes go to a temporary file
in the same directory, are flushed to disk, then renamed over the old file: a crash leaves the
previous checkpoint or the new one, never half of one.

Reading checks every field (`read_state`): a file that is not a serving state, or one whose
fields have the wrong types or values, raises `StateError` with what is wrong. The control
loop then ignores it with a warning, moves it aside (`set_aside`: renamed, never deleted, so
nothing is lost) and starts fresh. Whether a valid state fits the served model (its weights
fingerprint, its sites) is the control loop's check, since only it knows the model.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from apparate.policies.catalog import ADAPTIVE, SERVABLE as POLICIES

FORMAT = "apparate.serve-state/1"
FILE = "serve-state.json"


class StateError(ValueError):
    """A saved state that cannot be used; the message says why."""


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


@dataclass(frozen=True)
class SavedState:
    """A checkpoint whose every field has been checked (types and values; not yet the model)."""

    policy: str
    model_name: str
    fingerprint: str
    num_sites: int
    saved_at: float | None
    config: Any  # core.controller.Config
    profile: Any  # core.profile.LatencyProfile
    controller: dict[str, Any] | None  # Controller.state(), restored by the control loop
    raw: dict[str, Any]


def load_state(state_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The saved state as decoded JSON (checked like `read_state`), or None when there is none."""
    st = read_state(state_dir)
    return None if st is None else st.raw


def read_state(state_dir: str | os.PathLike) -> SavedState | None:
    """The saved state, or None when there is none. Anything unusable raises StateError."""
    p = state_path(state_dir)
    if not p.exists():
        return None
    if not p.is_file():
        raise StateError(f"{p} is not a regular file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise StateError(f"{p} cannot be read: {e}") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise StateError(f"{p} is not valid JSON: {e}") from None
    return parse_state(data, str(p))


def parse_state(data: Any, where: str = "the state") -> SavedState:
    """Check a decoded checkpoint field by field."""
    from apparate.core.controller import Config
    from apparate.core.profile import LatencyProfile

    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise StateError(f"{where} is not a serving state of format {FORMAT!r}")
    policy = data.get("policy")
    if policy not in POLICIES:
        raise StateError(f"{where}: 'policy' must be one of {', '.join(POLICIES)}, got {policy!r}")
    model = data.get("model")
    if not isinstance(model, dict):
        raise StateError(f"{where}: 'model' must be an object")
    fingerprint, name, sites = model.get("fingerprint"), model.get("name", ""), model.get("num_sites")
    if not isinstance(fingerprint, str):
        raise StateError(f"{where}: 'model.fingerprint' must be a string")
    if not isinstance(name, str):
        raise StateError(f"{where}: 'model.name' must be a string")
    if not isinstance(sites, int) or isinstance(sites, bool) or sites < 0:
        raise StateError(f"{where}: 'model.num_sites' must be a non-negative integer, got {sites!r}")
    saved_at = data.get("saved_at")
    if saved_at is not None and (not isinstance(saved_at, (int, float)) or isinstance(saved_at, bool)
                                 or not math.isfinite(saved_at)):
        raise StateError(f"{where}: 'saved_at' must be a number")
    cfg_d = data.get("config")
    if not isinstance(cfg_d, dict) or not isinstance(cfg_d.get("sites"), list) \
            or not isinstance(cfg_d.get("thresholds"), list):
        raise StateError(f"{where}: 'config' must be an object with 'sites' and 'thresholds' lists")
    try:
        config = Config.from_dict(cfg_d)
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise StateError(f"{where}: 'config' is invalid: {e}") from None
    if config.sites and max(config.sites) >= sites:
        raise StateError(f"{where}: 'config' names site {max(config.sites)} of a model with {sites} sites")
    prof_d = data.get("profile")
    if not isinstance(prof_d, dict):
        raise StateError(f"{where}: 'profile' must be an object")
    try:
        profile = LatencyProfile.from_dict(prof_d)
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise StateError(f"{where}: 'profile' is invalid: {e}") from None
    if profile.num_sites != sites:
        raise StateError(f"{where}: 'profile' has {profile.num_sites} sites, 'model' {sites}")
    ctl = data.get("controller")
    if ctl is not None and not isinstance(ctl, dict):
        raise StateError(f"{where}: 'controller' must be an object or null")
    if policy in ADAPTIVE and ctl is None:
        raise StateError(f"{where}: an {policy} state without 'controller'")
    return SavedState(policy, name, fingerprint, sites, None if saved_at is None else float(saved_at), config,
                      profile, ctl, data)


def set_aside(state_dir: str | os.PathLike) -> Path | None:
    """Rename an unusable state out of the way (file or directory); None if that failed too."""
    p = state_path(state_dir)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    for k in range(100):
        dest = p.with_name(f"{FILE}.unusable-{stamp}" + (f"-{k}" if k else ""))
        if dest.exists():
            continue
        try:
            os.replace(p, dest)
            return dest
        except OSError:
            return None
    return None
