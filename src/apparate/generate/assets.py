"""The trained token ramps, built once and cached under `~/.cache/apparate/generate/`.

Building: greedy text from `n` train prompts (`train.collect`), ramps fitted on 80% of the
tokens, the other 20% kept as the controller's bootstrap (every candidate's confidence and
agreement), all saved with safetensors + JSON. A few minutes on one CPU thread.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import paths
from .lm import LM
from .ramps import TokenRamps
from .train import agreement, collect, fit


@dataclass
class Assets:
    ramps: TokenRamps
    boot_conf: np.ndarray  # [N, S] held out from fitting
    boot_agree: np.ndarray
    info: dict[str, Any]


def _build(lm: LM, data_dir: str | os.PathLike | None, n_prompts: int, max_new_tokens: int, shortlist: int,
           rank: int):
    from .prompts import prompts

    def make(tmp: Path) -> dict[str, Any]:
        from safetensors.torch import save_file
        t0 = time.perf_counter()
        data = collect(lm, prompts(data_dir, "train", n_prompts), max_new_tokens, batch=32)
        t1 = time.perf_counter()
        N = data["targets"].numel()
        cut = int(N * 0.8)
        fit_data = {"feats": data["feats"][:, :cut], "targets": data["targets"][:cut]}
        boot = {"feats": data["feats"][:, cut:], "targets": data["targets"][cut:]}
        ramps = fit(lm, fit_data, shortlist=shortlist, rank=rank)
        t2 = time.perf_counter()
        ag = agreement(ramps, boot)
        save_file({"conf": torch.from_numpy(ag["conf"]).float().contiguous(),
                   "agree": torch.from_numpy(ag["agree"]).contiguous()}, str(tmp / "bootstrap.safetensors"))
        info = {"prompts": n_prompts, "max_new_tokens": max_new_tokens, "tokens": N, "fit_tokens": cut,
                "collect_s": round(t1 - t0, 1), "fit_s": round(t2 - t1, 1),
                "bootstrap_agreement": [round(float(a), 4) for a in ag["agree"].mean(0)]}
        ramps.save(tmp, info)
        save_file(data, str(tmp / "data.safetensors"))  # kept so ramps can be refitted without generating again
        return info
    return make


def load_assets(lm: LM, data_dir: str | os.PathLike | None = None, n_prompts: int = 256,
                max_new_tokens: int = 64, shortlist: int = 1024, rank: int = 64) -> Assets:
    """The ramps and bootstrap for these settings, built on first use (minutes) then cached."""
    from safetensors.torch import load_file
    name = f"smollm2-ramps-p{n_prompts}-t{max_new_tokens}-k{shortlist}-r{rank}"
    folder = paths.build_once(paths.cache_dir("generate") / name,
                              _build(lm, data_dir, n_prompts, max_new_tokens, shortlist, rank))
    ramps = TokenRamps.load(folder, lm.model.model.embed_tokens.weight, lm.model.model.norm)
    boot = load_file(str(folder / "bootstrap.safetensors"))
    return Assets(ramps, boot["conf"].double().numpy(), boot["agree"].numpy(), ramps.info)
