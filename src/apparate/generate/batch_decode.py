"""Several sequences in one decode step, each with its own exact KV cache and its own exits.

The deferral scheme of `decode.py` is kept per sequence: each sequence keeps its own `Decoder`
(cache, tokens, deferred rows, sampling noise), and one pass (`run_pass`) carries every
sequence's rows up the layers together. Per layer, each sequence's rows entering that layer
(its new token, plus its deferred rows that join at this layer, as in the one-sequence loop)
form a block; the blocks of all sequences run as one padded batch [B, kmax, H] with
per-sequence positions and an attention mask (`layer_rows`). A sequence whose token exits at a
ramp is emitted at once through its own callback and leaves the pass (its rows wait as
deferred rows, to rejoin in its next step); the others carry on. So the batch's rows advance
together layer by layer, and a row that exited simply stops being part of the batch.

What that costs, and why it was chosen over alternatives:
- The step ends when its deepest sequence ends: an exit at a ramp saves that sequence's share
  of the remaining layers' work (fewer rows in the batch) but does not start the next step
  earlier unless every sequence exits. Its token still reaches its client early.
- Blocks are padded to the longest block of the layer (a sequence with 3 deferred rows makes
  every sequence's block 3 rows long in the layers they share), so deferred rows cost more
  at batch B than at batch 1; pad rows attend to slot 0 only and their keys are never stored.
- Each sequence keeps its own cache (`decode.KVCache`), so joining and leaving the batch is
  free; the price is that each layer copies every sequence's cache into a padded key/value
  tensor (a few hundred kB per layer at batch 8 and 100 positions, small beside the layer's
  3.5 MB of weights). A shared paged cache would avoid the copy.
The one-sequence `Decoder` runs on this same pass with a batch of one, which skips the padding.

`BatchDecoder` is continuous batching: sequences join between steps (their prompts prefilled
together, as one padded batch, then their first token emitted) and leave when they finish (a
finished sequence with deferred rows completes them as part of the next step, then frees its
slot). `generate_batch` decodes a fixed list of prompts that way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .decode import Decoder, KVCache, Ramps, Sampling, Token, _Row
from .lm import LM


class _PaddedCache:
    """What a Hugging Face layer calls `update` on during one batched layer call: each sequence's
    real rows go into its own cache; the layer gets back keys/values padded to one length."""

    def __init__(self, caches: Sequence[KVCache], counts: Sequence[int], width: int):
        self.caches, self.counts, self.width = caches, counts, width

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        B, kvh, _, d = k.shape
        K = k.new_zeros(B, kvh, self.width, d)  # zeros, not empty: a masked NaN would still poison 0 * v
        V = v.new_zeros(B, kvh, self.width, d)
        for b, (cache, n) in enumerate(zip(self.caches, self.counts)):
            fk, fv = cache.update(k[b:b + 1, :, :n], v[b:b + 1, :, :n], layer_idx)
            K[b, :, :fk.shape[2]] = fk[0]
            V[b, :, :fv.shape[2]] = fv[0]
        return K, V


def layer_rows(lm: LM, i: int, blocks: Sequence[tuple[KVCache, torch.Tensor, int]]) -> list[torch.Tensor]:
    """Layer i over several sequences' blocks (cache, rows [k, H], first position); each cache
    must hold exactly the positions before its block. Returns each block's output rows [k, H]."""
    for cache, h, pos0 in blocks:
        if cache.length(i) != pos0:
            raise RuntimeError(f"layer {i} cache holds {cache.length(i)} positions, rows start at {pos0}")
    layer, rot = lm.layers[i], lm.model.model.rotary_emb
    if len(blocks) == 1:  # one sequence: its own cache, no padding (the batch-1 decode loop)
        cache, h, pos0 = blocks[0]
        k = h.shape[0]
        pos = torch.arange(pos0, pos0 + k).unsqueeze(0)
        mask = None
        if k > 1:  # row j sees the cache and rows 0..j
            mask = torch.ones(k, pos0 + k, dtype=torch.bool).tril(diagonal=pos0)[None, None]
        x = h.unsqueeze(0)
        return [layer(x, attention_mask=mask, position_ids=pos, cache=cache, position_embeddings=rot(x, pos))[0]]
    counts = [h.shape[0] for _, h, _ in blocks]
    starts = torch.tensor([p for _, _, p in blocks])
    kmax = max(counts)
    width = int(max(p + n for (_, _, p), n in zip(blocks, counts)))
    x = torch.zeros(len(blocks), kmax, blocks[0][1].shape[-1], dtype=blocks[0][1].dtype)
    for b, (_, h, _) in enumerate(blocks):
        x[b, :h.shape[0]] = h
    q = torch.arange(kmax)
    pos = starts[:, None] + q[None, :]  # [B, kmax] each row's own position
    # row q of sequence b sees its cache and its rows up to q; a pad row sees slot 0 only (never NaN)
    last = torch.where(q[None, :] < torch.tensor(counts)[:, None], pos, torch.zeros_like(pos))
    mask = (torch.arange(width)[None, None, :] <= last[:, :, None])[:, None]
    out = layer(x, attention_mask=mask, position_ids=pos, cache=_PaddedCache([c for c, _, _ in blocks], counts, width),
                position_embeddings=rot(x, pos))
    return [out[b, :n] for b, n in enumerate(counts)]


@dataclass
class _Share:
    """One sequence's part in a pass: its new token's record (None when it only completes
    deferred rows), whether that token may exit, and the rows it has in the pass."""

    dec: Decoder
    rec: Token | None
    may_exit: bool
    on_emit: Callable[[Token], None] | None
    h: torch.Tensor | None = None  # [k, H] rows in the pass, positions pos0..
    pos0: int = 0
    members: list[int] = field(default_factory=list)  # generated-token index of each row
    live: bool = True  # False once its token left at a ramp

    def target(self, t_idx: int) -> Token:
        d = self.dec
        return self.rec if (self.rec is not None and t_idx == len(d.tokens)) else d.tokens[t_idx]


def run_pass(lm: LM, shares: Sequence[_Share]) -> None:
    """One decode step for several sequences (see the module's docstring)."""
    for i in range(lm.num_layers):
        active = []
        for s in shares:
            if not s.live:
                continue
            d = s.dec
            while d.pending and d.pending[-1].reached == i - 1:  # deferred rows join where they stopped
                row = d.pending.pop()
                s.h = row.h[None] if s.h is None else torch.cat([row.h[None], s.h])
                s.pos0 = row.pos
                # the row at position p predicts token index p - prompt_len + 1
                s.members.insert(0, row.pos - d.prompt_len + 1)
            if s.h is not None:
                active.append(s)
        if not active:
            continue
        for s, out in zip(active, layer_rows(lm, i, [(s.dec.cache, s.h, s.pos0) for s in active])):
            s.h = out
        _ramps_at(i, active)
    done = [s for s in shares if s.live and s.h is not None]
    if not done:
        return
    # one vocabulary head for every sequence's rows (W @ x.T: extra rows ride along nearly free)
    logits = lm.deep_logits(torch.cat([s.h for s in done]))
    col = 0
    for s in done:
        k = s.h.shape[0]
        deep = s.dec._pick(logits[:, col:col + k], s.members).tolist()
        col += k
        for r, t_idx in enumerate(s.members):
            s.target(t_idx).deep = int(deep[r])
        if s.rec is not None:
            s.rec.token = s.rec.deep
            s.rec.released_s = time.perf_counter() - s.dec._t0
            if s.on_emit:
                s.on_emit(s.rec)


def _ramps_at(i: int, active: list[_Share]) -> None:
    """Score the rows at layer i's ramp (sequences decoded under the same Ramps share one call
    when greedy) and release the tokens that pass their threshold."""
    groups: dict[int, list[_Share]] = {}
    for s in active:
        if i in s.dec.at_layer and s.dec.ramps.score is not None:
            groups.setdefault(id(s.dec.ramps), []).append(s)
    for group in groups.values():
        j = group[0].dec.at_layer[i]
        greedy = [s for s in group if s.dec.sampling is None]
        scored: list[tuple[_Share, list, list]] = []
        if greedy:
            conf, tok = group[0].dec.ramps.score(j, torch.cat([s.h for s in greedy]))
            conf, tok, col = conf.tolist(), tok.tolist(), 0
            for s in greedy:
                k = s.h.shape[0]
                scored.append((s, conf[col:col + k], tok[col:col + k]))
                col += k
        for s in group:
            if s.dec.sampling is not None:  # its own Gumbel noise per token
                conf, tok = s.dec._ramp(j, s.h, s.members)
                scored.append((s, conf.tolist(), tok.tolist()))
        for s, conf, tok in scored:
            for r, t_idx in enumerate(s.members):
                t = s.target(t_idx)
                t.conf[j], t.ramp_token[j] = conf[r], tok[r]
            if s.rec is not None and s.may_exit and 1.0 - conf[-1] < s.dec.ramps.thresholds[j]:
                s.rec.token, s.rec.exit = int(tok[-1]), j
                s.rec.released_s = time.perf_counter() - s.dec._t0
                if s.on_emit:
                    s.on_emit(s.rec)
                for r, t_idx in enumerate(s.members):
                    s.dec.pending.append(_Row(t_idx + s.dec.prompt_len - 1, s.h[r], i))
                s.live = False


def prefill_rows(lm: LM, decs: Sequence[Decoder], prompts: Sequence[Sequence[int]]) -> list[int]:
    """Prefill several fresh decoders together (one padded batch per layer); returns each one's
    first token (always the deep model's) and records it as its first Token."""
    if len(decs) != len(prompts):
        raise ValueError("one prompt per decoder")
    if any(not p for p in prompts):
        raise ValueError("empty prompt")
    if any(d.prompt_len for d in decs):
        raise RuntimeError("prefill once per sequence")
    embed = lm.model.model.embed_tokens
    hs = [embed(torch.tensor(list(p))) for p in prompts]
    for i in range(lm.num_layers):
        hs = layer_rows(lm, i, [(d.cache, h, 0) for d, h in zip(decs, hs)])
    logits = lm.deep_logits(torch.stack([h[-1] for h in hs]))
    first = []
    for b, (d, p) in enumerate(zip(decs, prompts)):
        d.prompt_len = len(p)
        d._t0 = time.perf_counter()
        tok = int(d._pick(logits[:, b:b + 1], [0])[0])
        R = len(d.ramps.layers)
        d.tokens.append(Token(tok, R, 0.0, np.full(R, np.nan), np.full(R, -1), tok))
        first.append(tok)
    return first


@dataclass
class Slot:
    """A sequence in a `BatchDecoder`: its decoder, when it stops, where its tokens go."""

    dec: Decoder
    max_new_tokens: int
    stop: set[int]
    on_emit: Callable[[Token], None] | None = None
    tag: object = None  # the caller's handle (a request, the Config it was decoded under)
    finished: bool = False  # no more tokens; deferred rows (if any) complete in the next step
    _t0: float = 0.0
    _c0: float = 0.0

    def _check(self) -> None:
        toks = self.dec.tokens
        self.finished = len(toks) >= self.max_new_tokens or toks[-1].token in self.stop


class BatchDecoder:
    """Continuous batching: `join` new sequences between steps (up to `max_batch` at once),
    `step` advances every sequence by one token and returns those that left."""

    def __init__(self, lm: LM, max_batch: int = 8):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.lm, self.max_batch = lm, max_batch
        self.slots: list[Slot] = []
        self.steps = 0

    @property
    def free(self) -> int:
        return self.max_batch - len(self.slots)

    @torch.inference_mode()
    def join(self, slots: Sequence[Slot], prompts: Sequence[Sequence[int]]) -> None:
        """Prefill the new sequences together and emit their first tokens; they take part in the
        next step."""
        if len(slots) > self.free:
            raise RuntimeError(f"{len(slots)} sequences do not fit in {self.free} free slots")
        if not slots:
            return
        for s in slots:
            if s.max_new_tokens < 1:
                raise ValueError("max_new_tokens must be at least 1")
            s._t0, s._c0 = time.perf_counter(), time.process_time()
        prefill_rows(self.lm, [s.dec for s in slots], prompts)
        for s in slots:
            if s.on_emit:
                s.on_emit(s.dec.tokens[0])
            s._check()
            self.slots.append(s)

    @torch.inference_mode()
    def step(self) -> list[Slot]:
        """One pass for every sequence: a new token each for those still going, the deferred rows
        of those that finished. Returns the sequences that left (finished, nothing deferred);
        their decoders' `wall_s` / `cpu_s` span join to leave (CPU time is the whole batch's)."""
        shares, recs = [], []
        for s in self.slots:
            d = s.dec
            if s.finished:
                if d.pending:
                    shares.append(_Share(d, None, False, None))
                continue
            R = len(d.ramps.layers)
            rec = Token(-1, R, 0.0, np.full(R, np.nan), np.full(R, -1))
            n = d.prompt_len + len(d.tokens) - 1  # position of the token fed in
            x = d._embed(torch.tensor([d.tokens[-1].token]))
            shares.append(_Share(d, rec, len(d.pending) < d.max_deferred, s.on_emit, x, n, [len(d.tokens)]))
            recs.append((s, rec))
        run_pass(self.lm, shares)
        self.steps += 1
        for s, rec in recs:
            s.dec.tokens.append(rec)
            s._check()
        left = [s for s in self.slots if s.finished and not s.dec.pending]
        self.slots = [s for s in self.slots if not (s.finished and not s.dec.pending)]
        for s in left:
            s.dec.wall_s = time.perf_counter() - s._t0
            s.dec.cpu_s = time.process_time() - s._c0
        return left


def generate_batch(lm: LM, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                   ramps: Ramps | None = None, max_deferred: int = 8, stop: set[int] | None = None,
                   on_emit: Callable[[int, Token], None] | None = None,
                   sampling: Sampling | Sequence[Sampling | None] | None = None, max_batch: int | None = None,
                   ) -> list[Decoder]:
    """Decode several prompts together (greedy, or sampled per prompt), at most `max_batch` at a
    time (default: all); a waiting prompt takes the slot of one that finished. `on_emit(k, token)`
    gets prompt k's tokens as they are released. Returns the decoders in prompt order."""
    n = len(prompts)
    limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    draws = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * n
    if len(limits) != n or len(draws) != n:
        raise ValueError("one max_new_tokens and one sampling per prompt")
    stop = lm.eos_ids if stop is None else stop
    batch = BatchDecoder(lm, max_batch or max(n, 1))
    decs = [Decoder(lm, ramps, max_deferred, draws[k]) for k in range(n)]
    emit = (lambda k: (lambda t: on_emit(k, t))) if on_emit else (lambda k: None)
    waiting = list(range(n))
    while waiting or batch.slots:
        if waiting and batch.free:
            take, waiting = waiting[:batch.free], waiting[batch.free:]
            batch.join([Slot(decs[k], limits[k], stop, emit(k), k) for k in take], [prompts[k] for k in take])
        batch.step()
    return decs
