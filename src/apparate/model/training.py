"""Frozen-backbone ramp training (notes §2.1, A3).

1. Run the bootstrap inputs through the frozen backbone once, caching every site's reduced
   activation (each ramp's parameter-free first step) and the original model's answer.
2. Split off a held-out part (seeded). Train all candidate ramps together: the loss is the sum
   over sites of cross-entropy against the *original model's* predictions, never the labels,
   because a ramp is correct when it agrees with the model it stands in for. Ramps are
   independent given a frozen backbone, so one pass trains them all.
3. Keep each ramp's best epoch by held-out loss, then record every ramp's confidence and answer on
   the held-out inputs: the bootstrap `Recording` that initial ramp placement uses.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from apparate.core.recording import Recording
from apparate.model.ramps import ConfidenceFn, Ramp, confidence_fn, score
from apparate.model.sites import ModelInput, Site, call_model, primary_output


@dataclass
class Batch:
    """Model-ready inputs for a batch plus what is known about each input."""

    inputs: ModelInput
    labels: Sequence[int]  # ground truth in the target's label space, -1 where unknown
    costs: Sequence[int] | None = None  # per-input cost key (token length for text)


@dataclass
class ActivationCache:
    features: list[torch.Tensor]  # per site: [N, ...] output of the ramp's `reduce`
    final_pred: torch.Tensor  # [N] original model's answer (target label space)
    labels: np.ndarray  # [N], -1 where unknown
    costs: np.ndarray | None  # [N] or None

    @property
    def size(self) -> int:
        return int(self.final_pred.shape[0])


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int | None = None  # None: n_train / 16 within [32, 256], so small sets get enough steps
    lr: float = 3e-3
    weight_decay: float = 1e-4
    holdout: float = 0.1  # share of the bootstrap kept out of training, recorded for placement
    seed: int = 0


@dataclass
class TrainResult:
    recording: Recording  # held-out inputs: every candidate ramp's conf/pred
    metrics: dict[str, Any] = field(default_factory=dict)


def collect_activations(
    backbone: nn.Module,
    sites: Sequence[Site],
    ramps: Sequence[Ramp],
    batches: Iterable[Batch],
    label_map: Sequence[int] | None = None,
    progress: bool = True,
    total: int | None = None,
    device: Any = None,
) -> ActivationCache:
    """Run the frozen backbone once over the bootstrap inputs and cache each site's activation.
    `device`: where the backbone is (its batches go there); the cache is kept on the host, where
    the ramps train (they are small; the backbone's passes are what a GPU speeds up)."""
    from apparate.devices import to_device

    from tqdm.auto import tqdm

    modules = dict(backbone.named_modules())
    feats: list[list[torch.Tensor]] = [[] for _ in sites]
    finals, labels, costs = [], [], []
    mask_box: dict[str, torch.Tensor | None] = {"mask": None}
    lmap = None if label_map is None else torch.as_tensor(list(label_map), dtype=torch.long)

    def make_hook(i: int) -> Callable:
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            z = ramps[i].reduce(primary_output(out), mask_box["mask"]).detach()
            # Full feature maps (conv ramps) are large: store them in half precision.
            feats[i].append((z.half() if z.dim() > 2 else z.clone()).cpu())
        return hook

    handles = [modules[s.name].register_forward_hook(make_hook(s.index)) for s in sites]
    backbone.eval()
    try:
        with torch.no_grad(), tqdm(total=total, desc="caching site activations", disable=None if progress else True, unit="input") as bar:
            for b in batches:
                x = to_device(b.inputs, device)
                mask_box["mask"] = x.get("attention_mask") if isinstance(x, dict) else None
                out = call_model(backbone, x)
                pred = primary_output(out).argmax(dim=-1).cpu()
                finals.append(lmap[pred] if lmap is not None else pred)
                labels.extend(int(x) for x in b.labels)
                if b.costs is not None:
                    costs.extend(int(c) for c in b.costs)
                bar.update(len(pred))
    finally:
        for h in handles:
            h.remove()
    if not finals:
        raise ValueError("no bootstrap inputs")
    n = sum(len(f) for f in finals)
    return ActivationCache(
        features=[torch.cat(f) for f in feats],
        final_pred=torch.cat(finals),
        labels=np.asarray(labels, dtype=np.int64),
        costs=np.asarray(costs, dtype=np.int64) if len(costs) == n else None,
    )


def split_indices(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0 < holdout < 1:
        raise ValueError(f"holdout must be between 0 and 1, got {holdout}")
    if n < 4:
        raise ValueError(f"need at least 4 bootstrap inputs, got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    k = min(n - 2, max(2, int(round(holdout * n))))
    return np.sort(perm[k:]), np.sort(perm[:k])


def train_ramps(
    ramps: Sequence[Ramp],
    cache: ActivationCache,
    sites: Sequence[Site],
    config: TrainConfig = TrainConfig(),
    confidence: str | ConfidenceFn = "max_softmax",
    progress: bool = True,
) -> TrainResult:
    """Train every ramp against the original model's answers; return the held-out recording."""
    from tqdm.auto import tqdm

    torch.manual_seed(config.seed)
    conf_fn = confidence_fn(confidence)
    train_idx, hold_idx = split_indices(cache.size, config.holdout, config.seed)
    y = cache.final_pred
    tr = torch.as_tensor(train_idx)
    ho = torch.as_tensor(hold_idx)
    heads = [r.head for r in ramps]
    params = [p for h in heads for p in h.parameters()]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    bsz = config.batch_size or int(np.clip(len(train_idx) // 16, 32, 256))
    steps_per_epoch = max(1, int(np.ceil(len(train_idx) / bsz)))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(config.seed)
    best_loss = [float("inf")] * len(ramps)
    best_state = [copy.deepcopy(h.state_dict()) for h in heads]
    best_epoch = [0] * len(ramps)
    t0 = time.perf_counter()
    bar = tqdm(range(config.epochs), desc=f"training {len(ramps)} ramps", disable=None if progress else True, unit="epoch")
    for epoch in bar:
        for h in heads:
            h.train()
        order = tr[torch.randperm(len(tr), generator=gen)]
        for s in range(0, len(order), bsz):
            idx = order[s:s + bsz]
            target = y[idx]
            loss = sum(F.cross_entropy(h(f[idx].float()), target) for h, f in zip(heads, cache.features))
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[union-attr]
            opt.step()
            sched.step()
        losses, agree = _evaluate(heads, cache.features, y, ho)
        for i, l in enumerate(losses):
            if l < best_loss[i]:
                best_loss[i], best_epoch[i] = l, epoch
                best_state[i] = copy.deepcopy(heads[i].state_dict())
        bar.set_postfix(holdout_agree=f"{float(np.mean(agree)):.3f}")
    for h, st in zip(heads, best_state):
        h.load_state_dict(st)
        h.eval()
    train_s = time.perf_counter() - t0

    conf, pred = _record(heads, cache.features, ho, conf_fn)
    _, train_agree = _evaluate(heads, cache.features, y, tr)
    final_h = y[ho].numpy()
    labels = cache.labels[hold_idx]
    recording = Recording(
        conf=conf, pred=pred, final=final_h, labels=labels,
        lengths=None if cache.costs is None else cache.costs[hold_idx],
        site_names=tuple(s.name for s in sites),
        meta={"what": "bootstrap hold-out", "seed": config.seed, "bootstrap_index": hold_idx.tolist()},
    )
    hold_agree = recording.agree.mean(axis=0)
    known = cache.labels >= 0
    metrics = {
        "config": asdict(config),
        "bootstrap_inputs": cache.size,
        "train_inputs": int(len(train_idx)),
        "holdout_inputs": int(len(hold_idx)),
        "train_seconds": round(train_s, 2),
        "original_label_accuracy": (float((cache.final_pred.numpy()[known] == cache.labels[known]).mean())
                                    if known.any() else None),
        "sites": [
            {"index": s.index, "name": s.name, "train_agreement": round(float(train_agree[i]), 4),
             "holdout_agreement": round(float(hold_agree[i]), 4), "best_epoch": best_epoch[i],
             "holdout_loss": round(float(best_loss[i]), 4)}
            for i, s in enumerate(sites)
        ],
    }
    return TrainResult(recording, metrics)


def _evaluate(heads: Sequence[nn.Module], feats: Sequence[torch.Tensor], y: torch.Tensor,
              idx: torch.Tensor, chunk: int = 1024) -> tuple[list[float], list[float]]:
    losses, agree = [], []
    with torch.no_grad():
        for h, f in zip(heads, feats):
            h.eval()
            tot_l, tot_a = 0.0, 0
            for s in range(0, len(idx), chunk):
                j = idx[s:s + chunk]
                out = h(f[j].float())
                tot_l += float(F.cross_entropy(out, y[j], reduction="sum"))
                tot_a += int((out.argmax(-1) == y[j]).sum())
            losses.append(tot_l / max(1, len(idx)))
            agree.append(tot_a / max(1, len(idx)))
    return losses, agree


def _record(heads: Sequence[nn.Module], feats: Sequence[torch.Tensor], idx: torch.Tensor,
            conf_fn: ConfidenceFn) -> tuple[np.ndarray, np.ndarray]:
    confs, preds = [], []
    with torch.no_grad():
        for h, f in zip(heads, feats):
            c, p = score(h(f[idx].float()), conf_fn)
            confs.append(c.numpy())
            preds.append(p.numpy())
    return np.stack(confs, axis=1), np.stack(preds, axis=1)


def agreement_table(metrics: dict[str, Any]) -> str:
    """Per-site agreement with the original model, as printed by `apparate prepare`."""
    lines = [f"{'site':>4}  {'module':<28} {'train':>7} {'held-out':>9}"]
    for s in metrics["sites"]:
        lines.append(f"{s['index']:>4}  {s['name']:<28} {s['train_agreement']:>7.1%} {s['holdout_agreement']:>9.1%}")
    return "\n".join(lines)
