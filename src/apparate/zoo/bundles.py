"""Bundles whose model the zoo can rebuild: a named workload's (from the data directory or
registry packages) or a Hugging Face model directory's, as recorded in the bundle's manifest."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from apparate.model.bundle import Bundle, BundleError, load_bundle as load_with_model, read_manifest


def load_bundle(path: str | os.PathLike, model: nn.Module | None = None, data_dir: str | os.PathLike | None = None,
                load_model: bool = True, check_fingerprint: bool = True, device: Any = None) -> Bundle:
    """Restore a bundle; its zoo or Hugging Face model is rebuilt (with its workload, which
    supplies streams and encoding) unless `model` is given or `load_model` is False. `device`:
    where the model and ramps go (`model.bundle.load_bundle`); the workload's encoder still
    makes host tensors, which the serving codecs move once per batch."""
    workload: Any = None
    if load_model and model is None:
        src = read_manifest(path).get("model", {})
        if src.get("kind") == "zoo":
            from apparate.zoo.workloads import get_workload

            workload = get_workload(src["workload"], data_dir)
        elif src.get("kind") == "hf":
            from apparate.zoo.byo import hf_text_workload

            workload = hf_text_workload(src["path"], texts=None)
        else:
            raise BundleError(f"bundle {path} was prepared for a {src.get('class', 'custom')} model: "
                              "pass it as load_bundle(path, model=...)")
        model = workload.model
    return load_with_model(path, model=model, load_model=load_model, check_fingerprint=check_fingerprint,
                           workload=workload, device=device)
