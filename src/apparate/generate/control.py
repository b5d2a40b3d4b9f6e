"""Tokens as the controller's inputs: the same `core` Controller, fed one sequence at a time.

Each generated token (after the first, which comes out of the prompt's pass) is an input: its
confidence at every active ramp, and whether that ramp's token equals the deep model's token for
the same prefix (which the deferred layers always deliver), make a `core.Feedback`. Accuracy is
therefore token agreement with the deep model, the accuracy constraint and the ramp budget mean
what they mean for classification, and the latency profile is one decode step at batch 1: a
site's time is its layers, a ramp's is its lens and shortlist head, vanilla is 30 layers and the
full vocabulary head. Configs change between sequences (a sequence's tokens were all decoded
under one set of ramps).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..core.controller import Controller
from ..core.profile import LatencyProfile
from ..core.settings import Settings
from ..core.types import Config, Feedback
from .decode import Decoder, Ramps, Sampling, generate
from .lm import LM
from .ramps import TokenRamps


def step_profile(layers: Sequence[int], costs: dict[str, float]) -> LatencyProfile:
    """Batch-1 decode-step profile from `ramps.measure_costs`: candidate site j ends after layer
    layers[j]; every ramp costs the measured `ramp_ms`."""
    site = np.array([(l + 1) * costs["layer_ms"] for l in layers])[None, :]
    ramp = np.full_like(site, costs["ramp_ms"])
    names = tuple(f"layer{l + 1}" for l in layers)
    return LatencyProfile(batch_sizes=np.array([1]), site_ms=site, ramp_ms=ramp,
                          vanilla_ms=np.array([costs["step_ms"]]), site_names=names)


def token_settings(accuracy_constraint: float = 0.01, ramp_budget: float = 0.02, **kw: Any) -> Settings:
    """Controller settings for tokens: one observed "batch" is a whole sequence (tens of tokens),
    so ramps are reconsidered every 8 sequences (about the 256 inputs the slow loop wants)
    rather than every 30 batches as for classification."""
    return Settings(accuracy_constraint=accuracy_constraint, ramp_budget=ramp_budget,
                    adjust_every_batches=kw.pop("adjust_every_batches", 8), **kw)


def feedback(dec: Decoder, config: Config) -> Feedback | None:
    """One sequence's tokens as a Feedback for the sites it was decoded with (None if empty)."""
    rows = [t for t in dec.tokens[1:] if t.deep >= 0]
    if not rows or not config.sites:
        return None
    conf = np.stack([t.conf for t in rows])
    agree = np.stack([t.ramp_token == t.deep for t in rows])
    return Feedback(config.sites, config.thresholds, np.nan_to_num(conf, nan=0.0), agree)


class TokenTuner:
    """A Controller over token ramps; `generate` decodes with the current Config and feeds back."""

    def __init__(self, lm: LM, ramps: TokenRamps, controller: Controller, max_deferred: int = 8):
        self.lm, self.ramps, self.controller, self.max_deferred = lm, ramps, controller, max_deferred
        self._ramps_cache: tuple[Config, Ramps] | None = None

    @classmethod
    def from_bootstrap(cls, lm: LM, ramps: TokenRamps, costs: dict[str, float], conf: np.ndarray,
                       agree: np.ndarray, settings: Settings | None = None, **kw: Any) -> "TokenTuner":
        profile = step_profile(ramps.layers, costs)
        return cls(lm, ramps, Controller.from_bootstrap(profile, conf, agree, settings or token_settings()), **kw)

    @property
    def config(self) -> Config:
        return self.controller.config

    def decode_ramps(self, config: Config | None = None) -> Ramps:
        """The decode loop's Ramps for a Config; the same object for the same Config, so that the
        sequences a batch decodes under one Config score their rows in one call per ramp."""
        cfg = config or self.config
        cached = self._ramps_cache
        if cached is not None and cached[0] == cfg:
            return cached[1]
        ramps = Ramps(tuple(self.ramps.layers[s] for s in cfg.sites), cfg.thresholds,
                      lambda j, h, _s=cfg.sites: self.ramps.score(_s[j], h),
                      lambda j, h, g, t, _s=cfg.sites: self.ramps.sample(_s[j], h, g, t))
        self._ramps_cache = (cfg, ramps)
        return ramps

    def decoder(self, sampling: Sampling | None = None) -> tuple[Decoder, Config]:
        """A fresh one-sequence decoder under the current Config (for a `BatchDecoder` slot)."""
        cfg = self.config
        return Decoder(self.lm, self.decode_ramps(cfg), self.max_deferred, sampling), cfg

    def observe(self, dec: Decoder, config: Config) -> None:
        """Feed a finished sequence, decoded under `config`, to the controller."""
        fb = feedback(dec, config)
        if fb is not None:
            self.controller.observe(fb)
        elif not config.sites:
            # with no ramp there is no feedback; the controller re-places on its bootstrap
            self.controller.observe(Feedback((), (), np.zeros((len(dec.tokens), 0)),
                                             np.zeros((len(dec.tokens), 0), dtype=bool)))

    def mode(self) -> str:
        """One line saying whether ramps are on, and why not when they are off."""
        cfg = self.config
        if not cfg.sites:
            return ("ramps off: no ramp pays on this workload (no ramp saves more time than it costs "
                    "within the accuracy constraint and the ramp budget); decoding is vanilla")
        where = ", ".join(f"layer {self.ramps.layers[s] + 1} (t={t:.3f})" for s, t in zip(cfg.sites, cfg.thresholds))
        return f"ramps on at {where}"

    def generate(self, ids: Sequence[int], max_new_tokens: int, learn: bool = True, **kw: Any) -> Decoder:
        """Decode one prompt under the current Config; its tokens then feed the controller."""
        cfg = self.config
        dec = generate(self.lm, ids, max_new_tokens, self.decode_ramps(cfg), self.max_deferred, **kw)
        if learn:
            self.observe(dec, cfg)
        return dec

    def generate_batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, learn: bool = True,
                       **kw: Any) -> list[Decoder]:
        """Decode several prompts together (`batch_decode.generate_batch`) under the current
        Config; each finished sequence then feeds the controller, in prompt order."""
        from .batch_decode import generate_batch
        cfg = self.config
        decs = generate_batch(self.lm, prompts, max_new_tokens, self.decode_ramps(cfg), self.max_deferred, **kw)
        if learn:
            for dec in decs:
                self.observe(dec, cfg)
        return decs


def build_tuner(data_dir: Any, *, threads: int = 1, train_prompts: int = 256, accuracy_constraint: float = 0.01,
                ramp_budget: float = 0.02, max_deferred: int = 8, cost_reps: int = 30) -> tuple[Any, Any, dict, "TokenTuner"]:
    """The model, its ramps (built and cached on first use), their measured costs and a tuner placed
    on the ramps' bootstrap: what `apparate generate` and `apparate bench generate` both start from."""
    from .assets import load_assets
    from .lm import load_lm
    from .ramps import measure_costs

    lm = load_lm(threads=threads)
    assets = load_assets(lm, data_dir, n_prompts=train_prompts)
    costs = measure_costs(lm, assets.ramps, reps=cost_reps)
    settings = token_settings(accuracy_constraint, ramp_budget)
    tuner = TokenTuner.from_bootstrap(lm, assets.ramps, costs, assets.boot_conf, assets.boot_agree, settings,
                                      max_deferred=max_deferred)
    return lm, assets, costs, tuner
