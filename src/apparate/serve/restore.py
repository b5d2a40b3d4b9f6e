"""Restoring the control loop's policy from its state directory's checkpoint at start.

Whatever is unusable (not a state, wrong fields, another model's, sites this model lacks) is
logged, moved aside and the start is fresh: a bad file must never stop the server from starting.
A checkpoint of another policy gives the measured profile only; changed settings keep the saved
ramps and profile but re-tune.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apparate.core.controller import Config, Controller
from apparate.core.profile import LatencyProfile
from apparate.core.settings import Settings
from apparate.policies import ADAPTIVE, Policy
from apparate.policies.catalog import configured_policy, restored_policy

from .state import SavedState, StateError, read_state, set_aside

log = logging.getLogger("apparate.serve")


@dataclass
class Restored:
    """What a restore gave the control loop: the policy (None: place one afresh), the profile to
    go on with, and the record /earlyexit shows as `restored`."""

    policy: Policy | None
    profile: LatencyProfile
    info: dict[str, Any]


def try_restore(opt: Any, served: Any, settings: Settings, profile: LatencyProfile) -> Restored:
    """Restore from `opt.state_dir` (a ControlOptions'); `profile` is the one to keep when nothing
    usable is there."""
    where = Path(opt.state_dir)
    if where.exists() and not where.is_dir():
        raise ValueError(f"the state directory {where} is a file")
    out = Restored(None, profile, {"from": None})
    try:
        state = read_state(where)
        if state is None:
            return out
        out.policy = _restore(state, opt, served, settings, out)
        return out
    except Exception as e:  # noqa: BLE001 - StateError, or anything a restore raised
        reason = str(e) if isinstance(e, StateError) else f"{type(e).__name__}: {e}"
        moved = set_aside(where)
        log.warning("ignoring the saved state in %s: %s; %s; starting afresh", where, reason,
                    f"moved it to {moved.name}" if moved is not None else "it could not be moved aside")
        return Restored(None, profile, {"from": None, "ignored": reason,
                                        "moved_to": None if moved is None else str(moved)})


def _restore(state: SavedState, opt: Any, served: Any, settings: Settings, out: Restored) -> Policy | None:
    """The policy `state` gives; `out`'s profile and record are updated as far as it goes."""
    if state.fingerprint != served.fingerprint or state.num_sites != served.num_sites:
        raise StateError(f"it belongs to another model ({state.model_name or 'unnamed'}, "
                         f"{state.num_sites} sites)")
    out.profile = state.profile
    out.info = {"from": str(opt.state_dir), "saved_at": state.saved_at, "policy": state.policy, "what": "profile"}
    if state.policy != opt.policy:
        log.info("saved state was for policy %s: restored the measured profile only", state.policy)
        return None
    if opt.policy == "vanilla":
        return configured_policy(opt.policy, Config(), out.profile, settings)
    if opt.policy not in ADAPTIVE:  # a fixed configuration
        out.info["what"] = "profile, config"
        return configured_policy(opt.policy, state.config, out.profile, settings)
    try:
        boot = None if served.recording is None else (served.recording.conf, served.recording.agree)
        ctl = Controller.from_state(state.controller or {}, bootstrap=boot)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise StateError(f"its controller state is unusable ({type(e).__name__}: {e})") from None
    if ctl.profile.num_sites != served.num_sites or (ctl.config.sites and max(ctl.config.sites) >= served.num_sites):
        raise StateError("its controller names sites this model lacks")
    out.profile = ctl.profile
    if ctl.settings != settings:
        # Keep what was learnt about ramps and costs; the new settings apply from here on.
        log.info("settings changed since the checkpoint: keeping its ramps and profile, re-tuning")
        policy = configured_policy(opt.policy, ctl.config, ctl.profile, settings, served.recording,
                                   heads=getattr(served, "ee", None))
        out.info["what"] = "profile, config (settings changed)"
    else:
        policy = restored_policy(opt.policy, ctl, heads=getattr(served, "ee", None))
        out.info["what"] = "profile, config, controller window"
        if opt.policy == "apparate-learned":
            _restore_evidence(policy, state.raw.get("evidence"), out.info)
        if opt.policy == "apparate+heads":
            _restore_heads(policy, state.raw.get("heads"), out.info)
    log.info("restored the serving state from %s: ramps %s, version %d", opt.state_dir, list(policy.config.sites),
             policy.config.version)
    return policy


def _restore_evidence(policy: Any, saved: Any, info: dict[str, Any]) -> None:
    """apparate-learned: go on with the checkpoint's fit (its buffer of features is not saved);
    without a usable one, a fresh evidence model around the restored controller."""
    why = "the checkpoint has none"
    if isinstance(saved, dict):
        try:
            policy.restore_evidence(saved)
        except ValueError as e:
            why = f"the checkpoint's is unusable ({e})"
        else:
            log.info("apparate-learned: restored the evidence model's fit v%d; its buffer of features is not "
                     "checkpointed, refits use the inputs served from now on", policy.model.version)
            info["what"] += f" (evidence fit v{policy.model.version}, buffer fresh)"
            return
    log.info("apparate-learned: no evidence model restored (%s); a fresh one starts around the restored "
             "controller (scores are the ramps' confidences until its first refit)", why)
    info["what"] += " (evidence model fresh)"


def _restore_heads(policy: Any, saved: Any, info: dict[str, Any]) -> None:
    """apparate+heads: go on with the checkpoint's heads (the engine loads them before its first
    batch); their buffers start empty. Without usable ones, the bundle's heads."""
    if isinstance(saved, dict):
        try:
            policy.restore_heads(saved)
        except ValueError as e:
            log.info("apparate+heads: the checkpoint's heads are unusable (%s): the bundle's heads", e)
            info["what"] += " (heads: the bundle's)"
            return
        log.info("apparate+heads: restored heads version %d (%d sites changed since the bundle's)", policy.version,
                 len(policy.table().heads))
        info["what"] += f" (heads v{policy.version})"
        return
    info["what"] += " (heads: the bundle's)"
