"""Bundles: everything a server or a replay needs about a prepared model, in one directory.

    manifest.json      format version, model source and fingerprint, sites, ramp specs, latency
                       profile, training metrics, versions of what made it
    ramps.safetensors  every candidate ramp's weights (key "<site>.<param>")
    bootstrap.npz      the held-out bootstrap Recording (every ramp's conf/pred)

Nothing is pickled: JSON, safetensors and a pickle-free npz. `load_bundle` checks the format
version and the files before touching anything and says what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from apparate.core.profile import LatencyProfile
from apparate.core.recording import Recording
from apparate.model.early_exit import EarlyExitModel
from apparate.model.ramps import NLP_KINDS, RampSpec, build_ramps
from apparate.model.sites import Site

FORMAT = "apparate.bundle/1"
MANIFEST = "manifest.json"
RAMPS = "ramps.safetensors"
RECORDING = "bootstrap.npz"


class BundleError(ValueError):
    """A bundle that cannot be used: wrong version, missing or damaged files, other model."""


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]
    sites: list[Site]
    specs: list[RampSpec]
    ramps: nn.ModuleList
    profile: LatencyProfile
    recording: Recording
    model: nn.Module | None = None
    workload: Any = None  # the zoo Workload when the model came from the zoo
    extra: dict[str, Any] = field(default_factory=dict)
    device: Any = None  # torch.device the model and ramps were loaded onto (None: where they were made, the CPU)

    @property
    def num_sites(self) -> int:
        return len(self.sites)

    @property
    def kind(self) -> str:
        """The kind of workload, 'image' or 'text' (`Settings.for_kind`): its zoo workload's when
        loaded, else what its ramps read (text ramps read [tokens, hidden] site outputs)."""
        if self.workload is not None:
            return str(self.workload.kind)
        return "text" if self.specs and self.specs[0].kind in NLP_KINDS else "image"

    @property
    def label_map(self) -> list[int] | None:
        return self.manifest.get("label_map")

    @property
    def confidence(self) -> str:
        return self.manifest.get("confidence", "max_softmax")

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("training", {})

    def early_exit_model(self, active: Iterable[int] = (), model: nn.Module | None = None,
                         confidence: str | None = None, device: Any = None) -> EarlyExitModel:
        """An EarlyExitModel over the bundle's backbone (or `model`) with its trained ramps, on
        `device` (default: the bundle's, as loaded)."""
        backbone = model if model is not None else self.model
        if backbone is None:
            raise BundleError("this bundle's model is not loaded: pass model=... (the same model it was prepared for)")
        ee = EarlyExitModel(backbone, self.sites, list(self.ramps), active=active,
                            confidence=confidence or self.confidence, label_map=self.label_map)
        dev = device if device is not None else self.device
        return ee if dev is None else ee.to(dev)


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes): a bundle knows its model."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def versions() -> dict[str, str]:
    from apparate import __version__

    out = {"apparate": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for mod in ("numpy", "transformers", "safetensors"):
        m = sys.modules.get(mod)
        if m is not None:
            out[mod] = getattr(m, "__version__", "?")
    return out


def save_bundle(
    out: str | os.PathLike,
    *,
    source: Mapping[str, Any],
    model: nn.Module,
    sites: Sequence[Site],
    specs: Sequence[RampSpec],
    ramps: Sequence[nn.Module],
    profile: LatencyProfile,
    recording: Recording,
    training: Mapping[str, Any],
    confidence: str = "max_softmax",
    label_map: Sequence[int] | None = None,
    class_names: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a bundle directory (created if needed; its three files are replaced)."""
    from safetensors.torch import save_file

    if not (len(sites) == len(specs) == len(ramps) == profile.num_sites == recording.num_sites):
        raise ValueError("sites, ramp specs, ramps, profile and recording disagree on the number of sites")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, r in enumerate(ramps) for k, v in r.state_dict().items()}
    save_file(tensors, str(out / RAMPS))
    recording.save(out / RECORDING)
    manifest = {
        "format": FORMAT,
        "model": {**dict(source), "fingerprint": model_fingerprint(model), "class": type(model).__qualname__},
        "sites": [s.to_dict() for s in sites],
        "ramps": [s.to_dict() for s in specs],
        "confidence": confidence,
        "label_map": None if label_map is None else [int(x) for x in label_map],
        "class_names": list(class_names),
        "profile": profile.to_dict(),
        "training": dict(training),
        "versions": versions(),
        "files": {"ramps": RAMPS, "recording": RECORDING},
        **(dict(extra) if extra else {}),
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)  # the manifest last: a half-written bundle has none
    return out


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"no bundle directory at {path}")
    mf = path / MANIFEST
    if not mf.exists():
        raise BundleError(f"{path} is not a bundle: {MANIFEST} is missing (was `apparate prepare` interrupted?)")
    try:
        manifest = json.loads(mf.read_text())
    except ValueError as e:
        raise BundleError(f"{mf} is not valid JSON: {e}") from None
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt != FORMAT:
        made = (manifest.get("versions", {}) or {}).get("apparate", "?") if isinstance(manifest, dict) else "?"
        raise BundleError(f"{path} is a bundle of format {fmt!r} (made by apparate {made}); this apparate reads "
                          f"{FORMAT!r}: prepare it again with `apparate prepare`")
    missing = [f for f in (RAMPS, RECORDING) if not (path / f).exists()]
    if missing:
        raise BundleError(f"bundle {path} is incomplete: missing {', '.join(missing)}; prepare it again")
    return manifest


def load_bundle(path: str | os.PathLike, model: nn.Module | None = None, load_model: bool = True,
                check_fingerprint: bool = True, workload: Any = None, device: Any = None) -> Bundle:
    """Restore a bundle, with `model` (the one it was made for) or without any (`load_model`
    False: profile, recording and ramps only). `apparate.zoo.load_bundle` rebuilds zoo and Hugging
    Face models from the bundle's manifest instead.

    `device` (a torch.device or a `--device` string): the ramps and the model are moved there
    once checked. The bundle itself names no device: the same files serve on any."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    manifest = read_manifest(path)
    try:
        sites = [Site.from_dict(s) for s in manifest["sites"]]
        specs = [RampSpec.from_dict(s) for s in manifest["ramps"]]
        profile = LatencyProfile.from_dict(manifest["profile"])
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{path / MANIFEST} is damaged: {e}") from None
    if len(sites) != len(specs) or profile.num_sites != len(sites):
        raise BundleError(f"{path / MANIFEST} is damaged: {len(sites)} sites, {len(specs)} ramps, "
                          f"{profile.num_sites} profiled sites")
    ramps = build_ramps(specs)
    try:
        tensors = load_file(str(path / RAMPS))
    except (SafetensorError, OSError) as e:
        raise BundleError(f"{path / RAMPS} is damaged: {e}") from None
    for i, r in enumerate(ramps):
        prefix = f"{i}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            r.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise BundleError(f"{path / RAMPS} does not match ramp {i} ({specs[i].kind}): {str(e).splitlines()[0]}") from None
    ramps.eval()
    try:
        recording = Recording.load(path / RECORDING)
    except ValueError as e:
        raise BundleError(str(e)) from None
    if recording.num_sites != len(sites):
        raise BundleError(f"{path / RECORDING} has {recording.num_sites} sites, the manifest {len(sites)}")

    src = manifest.get("model", {})
    if load_model and model is None:
        how = ("load it with apparate.zoo.load_bundle, which rebuilds it" if src.get("kind") in ("zoo", "hf")
               else "pass it as load_bundle(path, model=...)")
        raise BundleError(f"bundle {path} was prepared for a {src.get('workload') or src.get('class', 'custom')} "
                          f"model: {how}")
    if model is not None and check_fingerprint and src.get("fingerprint"):
        if model_fingerprint(model) != src["fingerprint"]:
            raise BundleError(f"the model given differs from the one bundle {path} was prepared for "
                              "(weights fingerprint mismatch): prepare the bundle again for this model")
    dev = None
    if device is not None:
        from apparate.devices import resolve_device

        dev = resolve_device(device)
        ramps.to(dev)
        if model is not None:
            model.to(dev)  # after the fingerprint, which reads the weights as they were given
    return Bundle(path, manifest, sites, specs, ramps, profile, recording, model, workload, device=dev)
