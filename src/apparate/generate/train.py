"""Ramp training data and fitting, with the model frozen.

`collect` generates text greedily from prompts (batched, left-padded) and runs it back through
the model once, keeping at every candidate site the hidden state of each position that predicts
a generated token and, as the target, the final layer's token there (the deep answer). `fit`
picks the shortlist (the K most frequent targets) and learns each site's lens and bias.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .lm import LM
from .ramps import TokenRamps

CANDIDATE_LAYERS = (2, 5, 8, 11, 14, 17, 20, 23, 26)  # after layer i (0-based) of 30


@torch.inference_mode()
def collect(lm: LM, texts: Sequence[str], max_new_tokens: int = 48, layers: Sequence[int] = CANDIDATE_LAYERS,
            batch: int = 8) -> dict[str, torch.Tensor]:
    """{'feats': [S, N, H] float16, 'targets': [N]} over every generated position."""
    pad = int(lm.model.config.pad_token_id if lm.model.config.pad_token_id is not None else 2)
    eos = lm.eos_ids
    feats, targets = [], []
    for b0 in range(0, len(texts), batch):
        ids = [lm.chat_ids(t) for t in texts[b0:b0 + batch]]
        P = max(len(x) for x in ids)
        inp = torch.tensor([[pad] * (P - len(x)) + x for x in ids])
        att = torch.tensor([[0] * (P - len(x)) + [1] * len(x) for x in ids])
        seq = lm.model.generate(inp, attention_mask=att, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=pad)
        T = seq.shape[1] - P
        full_att = torch.cat([att, torch.ones(len(ids), T, dtype=att.dtype)], dim=1)
        out = lm.model(seq, attention_mask=full_att, output_hidden_states=True)
        deep = out.logits.argmax(-1)
        for b in range(len(ids)):
            n = 0  # generated tokens up to and including the first end token
            while n < T:
                n += 1
                if int(seq[b, P + n - 1]) in eos:
                    break
            rows = torch.arange(P - 1, P - 1 + n)
            feats.append(torch.stack([out.hidden_states[l + 1][b, rows] for l in layers]).half())
            targets.append(deep[b, rows])
    return {"feats": torch.cat(feats, dim=1), "targets": torch.cat(targets)}


def fit(lm: LM, data: dict[str, torch.Tensor], layers: Sequence[int] = CANDIDATE_LAYERS, shortlist: int = 1024,
        rank: int = 64, epochs: int = 6, lr: float = 3e-3, seed: int = 0) -> TokenRamps:
    """Ramps for every candidate layer, trained on `collect`'s data with the model frozen."""
    torch.manual_seed(seed)
    targets = data["targets"]
    counts = torch.bincount(targets, minlength=lm.model.config.vocab_size)
    short = counts.argsort(descending=True)[:shortlist]
    short = short[counts[short] > 0]
    index = torch.full((lm.model.config.vocab_size,), len(short), dtype=torch.long)
    index[short] = torch.arange(len(short))
    y = index[targets]  # position in the shortlist, or len(short) = "other"
    ramps = TokenRamps(lm.model.model.embed_tokens.weight, lm.model.model.norm, layers, short, rank)
    opt = torch.optim.Adam([ramps.U, ramps.V, ramps.bias, ramps.other], lr=lr)
    N = targets.numel()
    for _ in range(epochs):
        perm = torch.randperm(N)
        for s in range(0, N, 256):
            idx = perm[s:s + 256]
            loss = sum(F.cross_entropy(ramps.logits(j, data["feats"][j, idx].float()), y[idx])
                       for j in range(len(layers)))
            opt.zero_grad()
            loss.backward()
            opt.step()
    ramps.eval()
    ramps.requires_grad_(False)
    return ramps


@torch.inference_mode()
def agreement(ramps: TokenRamps, data: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per site: (confidence [N], agrees-with-deep [N]) of each ramp on `collect`'s data."""
    conf, agree = [], []
    for j in range(len(ramps.layers)):
        c, tok = ramps.score(j, data["feats"][j].float())
        conf.append(c)
        agree.append(tok == data["targets"])
    return {"conf": torch.stack(conf, 1).numpy(), "agree": torch.stack(agree, 1).numpy()}
