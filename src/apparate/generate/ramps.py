"""Learned token ramps: a low-rank lens and a shortlist head per site, scored on the final norm.

The model's own head on an intermediate layer rarely agrees with the final token, and that head
(576 x 49,152) costs about as much as 8 of the 30 layers. A ramp here is instead:

    z = norm(h) ;  z' = z + U (V z)          (rank r, U starts at zero: the logit lens)
    logits = E_S z' + b  over a shortlist S of K frequent tokens, plus one "other" logit

E_S are the model's own (tied) embedding rows of the shortlist, frozen and shared by every
site; U, V, b and the "other" row are learned per site with the model frozen, against the
model's own final token. Confidence = the top shortlist token's softmax probability (with
"other" in the normaliser, so a token outside the shortlist pulls it down). Cost per site is
K x 576 + 2 r x 576 multiply-adds, measured (`measure_costs`) as a share of a decode step.
Saved as safetensors (weights) + JSON (sites, shortlist size, rank, costs).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

FORMAT = "apparate.token-ramps/1"


class TokenRamps(nn.Module):
    def __init__(self, embed: torch.Tensor, norm: nn.Module, layers: Sequence[int], shortlist: torch.Tensor,
                 rank: int = 64):
        super().__init__()
        H = embed.shape[1]
        self.layers = tuple(int(l) for l in layers)
        self.rank = int(rank)
        self.norm = norm  # the model's final RMSNorm (frozen, not saved)
        self.register_buffer("shortlist", shortlist.long().clone())
        self.register_buffer("E", embed[self.shortlist].detach().clone())
        R = len(self.layers)
        self.V = nn.Parameter(torch.randn(R, rank, H) / H ** 0.5)
        self.U = nn.Parameter(torch.zeros(R, H, rank))
        self.bias = nn.Parameter(torch.zeros(R, len(shortlist)))
        self.other = nn.Parameter(torch.zeros(R, H + 1))
        self.costs: dict[str, float] = {}

    def logits(self, j: int, h: torch.Tensor) -> torch.Tensor:
        """[k, K + 1] for hidden rows h [k, H] at active index j (last column: "other")."""
        z = self.norm(h)
        z = z + (z @ self.V[j].T) @ self.U[j].T
        short = z @ self.E.T + self.bias[j]
        other = z @ self.other[j, :-1] + self.other[j, -1]
        return torch.cat([short, other.unsqueeze(-1)], dim=-1)

    def score(self, j: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(confidence [k], vocabulary token [k]) of ramp j on hidden rows h [k, H]."""
        lg = self.logits(j, h)
        p = lg.softmax(-1)[:, :-1]
        conf, idx = p.max(-1)
        return conf, self.shortlist[idx]

    def sample(self, j: int, h: torch.Tensor, g: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampled decoding: ramp j's token is argmax over its shortlist of logits / T + the same
        Gumbel noise g [k, V] the deep head draws with; its confidence, that token's probability
        under the ramp's tempered distribution ("other" included)."""
        lg = self.logits(j, h) / temperature
        idx = (lg[:, :-1] + g[:, self.shortlist]).argmax(-1)
        conf = lg.softmax(-1).gather(1, idx[:, None]).squeeze(1)
        return conf, self.shortlist[idx]

    # ------------------------------------------------------------------ files
    def save(self, folder: str | Path, info: dict[str, Any] | None = None) -> Path:
        from safetensors.torch import save_file
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()
                   if not k.startswith("norm.") and k != "E"}, str(folder / "ramps.safetensors"))
        meta = {"format": FORMAT, "layers": list(self.layers), "rank": self.rank,
                "shortlist": int(self.shortlist.numel()), "costs": self.costs, **(info or {})}
        (folder / "ramps.json").write_text(json.dumps(meta, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path, embed: torch.Tensor, norm: nn.Module) -> "TokenRamps":
        from safetensors.torch import load_file
        folder = Path(folder)
        meta = json.loads((folder / "ramps.json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{folder}: not a token-ramps folder (format {meta.get('format')!r})")
        state = load_file(str(folder / "ramps.safetensors"))
        ramps = cls(embed, norm, meta["layers"], state["shortlist"], meta["rank"])
        missing, unexpected = ramps.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"E"} - {k for k in missing if k.startswith("norm.")}:
            raise ValueError(f"{folder}: ramp weights do not match (missing {missing}, unexpected {unexpected})")
        ramps.costs = {str(k): float(v) for k, v in meta.get("costs", {}).items()}
        ramps.info = meta
        return ramps


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.process_time()  # CPU time: the machine's other load does not inflate it
        fn()
        times.append((time.process_time() - t) * 1e3)
    return float(sorted(times)[len(times) // 2])


@torch.inference_mode()
def measure_costs(lm: Any, ramps: TokenRamps, reps: int = 30) -> dict[str, float]:
    """Times (ms, this process's CPU time, medians over `reps`) of a layer and of the full
    vocabulary head at one row and at two (a deferred row riding along), of one ramp, and of a
    whole decode step at one row, at a cache of 64 positions. A layer's time is a pass over all
    30 divided by 30: one layer timed alone keeps its 14 MB of weights in cache and read 3x too
    fast, while a step streams every layer's weights from memory."""
    from .decode import KVCache
    H, cfg = lm.hidden, lm.model.config
    cache = KVCache(lm.num_layers)
    for i in range(lm.num_layers):
        cache.update(torch.randn(1, cfg.num_key_value_heads, 64, cfg.head_dim),
                     torch.randn(1, cfg.num_key_value_heads, 64, cfg.head_dim), i)

    def all_layers(k: int):
        x, pos = torch.randn(1, k, H), torch.arange(64, 64 + k)[None]
        pe = lm.model.model.rotary_emb(x, pos)
        mask = None if k == 1 else torch.ones(k, 64 + k, dtype=torch.bool).tril(diagonal=64)[None, None]

        def run():
            h = x
            for i, layer in enumerate(lm.layers):
                h = layer(h, attention_mask=mask, position_ids=pos, cache=cache, position_embeddings=pe)
                cache.k[i], cache.v[i] = cache.k[i][:, :, :64], cache.v[i][:, :, :64]
        return run

    h, h2 = torch.randn(1, H), torch.randn(2, H)
    L = lm.num_layers
    out = {
        "layer_ms": _median_ms(all_layers(1), reps) / L,
        "layer_2rows_ms": _median_ms(all_layers(2), reps) / L,
        "ramp_ms": _median_ms(lambda: ramps.score(0, h), reps * 5),
        "head_ms": _median_ms(lambda: lm.deep_tokens(h), reps * 2),
        "head_2rows_ms": _median_ms(lambda: lm.deep_tokens(h2), reps * 2),
    }
    out["step_ms"] = out["layer_ms"] * L + out["head_ms"]
    out["ramp_share"] = out["ramp_ms"] / out["step_ms"]
    out["head_share"] = out["head_ms"] / out["step_ms"]
    out["threads"] = float(torch.get_num_threads())
    return out
