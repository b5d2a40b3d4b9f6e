"""Greedy or sampled decoding with a KV cache and per-token exits, skipped layers deferred and
kept exact.

A token released at a ramp after layer i is emitted at once; its layers i+1.. are not dropped
but deferred: the next token's step carries the deferred rows along from layer i+1 on (the
rows of one layer run as one small matrix product, as FREE's synchronized parallel decoding
does). So every layer's KV cache ends up exactly what the full model computes for the emitted
sequence, and every token still gets the deep model's answer (its final-layer argmax), which is
the controller's feedback. On a CPU at batch 1 the layers are mostly bound by reading their
weights, so a second row costs less than a step of its own (measured over the 30 layers: +9%
for a second row, +22% for a third): that difference is all the time exits can save here. A token that runs to
the end, or `flush()` at the end of a sequence, completes all deferred rows; `max_deferred`
bounds how many may wait (a token is kept from exiting while that many are deferred).

Sampled decoding (`Sampling`) draws each token with the Gumbel-max trick, argmax(logits / T + g_t),
the noise g_t drawn from a seed for token index t. A ramp samples with the same g_t over its
shortlist, so "the ramp's token equals the deep one" keeps its meaning: the ramp agrees when its
sample is the sample the deep model would have drawn for the same prefix, and that is the
feedback and the accuracy, as under greedy decoding (temperature 0).

The pass over the layers itself (`run_pass`) lives in `batch_decode.py`: a `Decoder` is one
sequence's state, and the same pass decodes one sequence or several together.

Pending rows have non-increasing depth in position order (a row that joins a later token's pass
is carried to where that token stops), so each layer's cache always holds a prefix of the
sequence and the rows entering a layer are the positions right after it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .lm import LM


class KVCache:
    """Per-layer keys and values, appended in position order (the HF layers call `update`)."""

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.k[layer_idx] is not None:
            k = torch.cat([self.k[layer_idx], k], dim=2)
            v = torch.cat([self.v[layer_idx], v], dim=2)
        self.k[layer_idx], self.v[layer_idx] = k, v
        return k, v

    def length(self, layer: int) -> int:
        k = self.k[layer]
        return 0 if k is None else int(k.shape[2])


@dataclass
class Token:
    """One generated position: what was emitted, where, and what the deep model said."""

    token: int  # the emitted token
    exit: int  # index into the active sites it was released at; len(sites) = the final layer
    released_s: float  # seconds since the sequence's first decode step began
    conf: np.ndarray  # confidence of every active ramp (filled as the row passes each site)
    ramp_token: np.ndarray  # each active ramp's token
    deep: int = -1  # the final layer's token for the same prefix (-1 until the row completes)


@dataclass
class Ramps:
    """What the decode loop needs of a set of ramps: layer index per active site, thresholds,
    a scorer (active index, hidden rows [k, H]) -> (confidence [k], token [k]), and for sampled
    decoding a sampler (active index, rows [k, H], Gumbel noise [k, V], temperature) -> the same."""

    layers: tuple[int, ...] = ()
    thresholds: tuple[float, ...] = ()
    score: Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    sample: Callable[[int, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass(frozen=True)
class Sampling:
    """Sampled decoding at `temperature` (0: greedy), reproducible from `seed`."""

    temperature: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")

    def noise(self, t: int, vocab: int) -> torch.Tensor:
        """Gumbel noise [vocab] for generated token index t (the same for the ramps and the deep head)."""
        g = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(t))
        u = torch.rand(vocab, generator=g).clamp_(1e-20, 1.0)
        return -torch.log(-torch.log(u))


@dataclass
class _Row:
    pos: int
    h: torch.Tensor  # [H], output of layer `reached`
    reached: int


class Decoder:
    """One sequence's decode state. `prefill` the prompt, then `step` token by token."""

    def __init__(self, lm: LM, ramps: Ramps | None = None, max_deferred: int = 8, sampling: Sampling | None = None):
        self.lm = lm
        self.ramps = ramps or Ramps()
        if len(self.ramps.layers) != len(self.ramps.thresholds):
            raise ValueError("one threshold per ramp")
        self.sampling = sampling if sampling is not None and sampling.temperature > 0 else None
        if self.sampling and self.ramps.layers and self.ramps.sample is None:
            raise ValueError("sampled decoding needs ramps that can sample (Ramps.sample)")
        self._noise: dict[int, torch.Tensor] = {}  # token index -> its Gumbel noise, until its deep token
        self.at_layer = {l: j for j, l in enumerate(self.ramps.layers)}
        self.max_deferred = max_deferred
        self.cache = KVCache(lm.num_layers)
        self.tokens: list[Token] = []  # generated positions, in order
        self.pending: list[_Row] = []
        self.prompt_len = 0
        self._t0: float | None = None
        self.wall_s = self.cpu_s = 0.0
        m = lm.model.model
        self._embed = m.embed_tokens

    def _g(self, idx: list[int]) -> torch.Tensor:
        """Gumbel noise rows [k, V] for generated token indices idx (kept until their deep token)."""
        V = self.lm.vocab_size
        for t in idx:
            if t not in self._noise:
                self._noise[t] = self.sampling.noise(t, V)
        return torch.stack([self._noise[t] for t in idx])

    def _pick(self, logits: torch.Tensor, idx: list[int]) -> torch.Tensor:
        """The deep model's tokens from vocabulary logits [V, k] of generated token indices idx:
        the argmax, or under sampling the Gumbel-max draw with each token's own noise."""
        if self.sampling is None:
            return logits.argmax(0)
        g = self._g(idx)
        for t in idx:
            self._noise.pop(t, None)
        return (logits.T / self.sampling.temperature + g).argmax(-1)

    def _ramp(self, j: int, h: torch.Tensor, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sampling is None:
            return self.ramps.score(j, h)
        return self.ramps.sample(j, h, self._g(idx), self.sampling.temperature)

    @torch.inference_mode()
    def prefill(self, ids: Sequence[int]) -> int:
        """Run the prompt through every layer; return the first generated token (always deep)."""
        from .batch_decode import prefill_rows  # the same pass as batched decoding, for one sequence
        if self.prompt_len:
            raise RuntimeError("prefill once per sequence")
        return prefill_rows(self.lm, [self], [ids])[0]

    @torch.inference_mode()
    def step(self, on_emit: Callable[[Token], None] | None = None) -> Token:
        """Feed the last emitted token; return the next one (emitted at a ramp or at the end)."""
        from .batch_decode import _Share, run_pass
        if not self.prompt_len:
            raise RuntimeError("prefill first")
        x = self.tokens[-1].token
        n = self.prompt_len + len(self.tokens) - 1  # position of the token fed in
        R = len(self.ramps.layers)
        rec = Token(-1, R, 0.0, np.full(R, np.nan), np.full(R, -1))
        may_exit = len(self.pending) < self.max_deferred
        run_pass(self.lm, [_Share(self, rec, may_exit, on_emit, self._embed(torch.tensor([x])), n, [len(self.tokens)])])
        self.tokens.append(rec)
        return rec

    @torch.inference_mode()
    def flush(self) -> None:
        """Complete every deferred row (end of sequence): the cache and deep answers fill in."""
        from .batch_decode import _Share, run_pass
        if self.pending:
            run_pass(self.lm, [_Share(self, None, False, None)])


def generate(lm: LM, ids: Sequence[int], max_new_tokens: int, ramps: Ramps | None = None,
             max_deferred: int = 8, stop: set[int] | None = None,
             on_emit: Callable[[Token], None] | None = None, sampling: Sampling | None = None) -> Decoder:
    """Greedy (or, with `sampling`, sampled) decoding of one prompt; returns the decoder (tokens,
    cache) after a final flush."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    dec = Decoder(lm, ramps, max_deferred, sampling)
    t0, c0 = time.perf_counter(), time.process_time()
    dec.prefill(ids)
    if on_emit:
        on_emit(dec.tokens[0])
    stop = lm.eos_ids if stop is None else stop
    while len(dec.tokens) < max_new_tokens and dec.tokens[-1].token not in stop:
        dec.step(on_emit)
    dec.flush()
    dec.wall_s = time.perf_counter() - t0  # prefill, every step and the final flush
    dec.cpu_s = time.process_time() - c0  # the same in this process's CPU time (others' load aside)
    return dec
