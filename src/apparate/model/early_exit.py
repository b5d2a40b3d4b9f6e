"""EarlyExitModel: an untouched backbone plus ramps that run from forward hooks.

The backbone is never modified or re-compiled. A forward hook is attached to a candidate site
only while some call has that site active (a module with no hooks takes PyTorch's fast call
path, so inactive sites cost nothing); the hook checks the calling thread's active set (the
active set is an immutable tuple swapped atomically, so a controller thread can change it between
batches), runs the ramp on the site's output, and calls the per-site callback right away: that is
where a live server releases answers while the batch runs on. While no callback asks to drop rows,
hooks return nothing, so the backbone's own computation, and hence its final output, is
bit-identical to the bare model's.

Dropping rows (early stop): a callback may return a boolean numpy array over the batch's current
rows, the rows to keep. The hook then returns the site's output cut to those rows (a forward
hook's return value replaces the module's output), so every later layer runs on fewer rows; the
kept rows' answers are those the full batch would have given (up to the float rounding of a
kernel run at another batch size). Tensors the backbone computed for the whole batch before the
drop and hands to later layers (a text encoder's attention mask, given to every encoder layer)
are cut too: while a call has dropped rows, a forward pre-hook on every later site's module
indexes each tensor argument whose first dimension is the original batch size with the kept
rows. That covers the project's models (CNNs pass one tensor between blocks; Hugging Face
encoders pass the mask to each layer, which are the sites); a model that uses a full-batch
tensor elsewhere after a site (e.g. a masked mean in its own `forward`) fails or answers
differently, which `drop_rows_work` checks before a server turns early stop on. Each
`RampResult` and the `EarlyExitOutput` carry `rows`, the original batch indices of their rows
(None: every row, in order). A batch whose rows have all left stops at once (the hook raises a
private exception that `forward` catches): its output has `final=None` and no rows.

The hook is the hot path of early exits: it runs once per active ramp per batch, and on a CPU at
batch 1 a ramp's arithmetic takes microseconds, so everything around it counts. A ramp runs as
its `Ramp.fast` function (two to four torch ops, no module calls), its confidence and answer are
read from the logits on the host (`ramps.scorer`) only when the callback asks (a ramp that
cannot release anything is scored after the batch, with the others, in one step), per-batch
work (text token weights) is done once per batch, and a ramp's result is a small object.
`apparate bench ramps` measures what is left.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from apparate.model.ramp_results import RampResult, detecting_for, fast_for, features_for, score_all
from apparate.model.ramps import ConfidenceFn, confidence_fn, scorer, token_weights
from apparate.model.sites import ModelInput, Site, call_model, primary_output


@dataclass(frozen=True)
class EarlyExitOutput:
    final: Any  # the backbone's output, exactly as the bare model returns it (None: every row left early)
    final_pred: torch.Tensor  # [B'] the original model's answer (mapped to the target labels) for `rows`
    ramps: dict[int, RampResult] = field(default_factory=dict)  # active sites, execution order
    rows: np.ndarray | None = None  # original batch indices of final's rows; None: every row, in order

    @property
    def stopped(self) -> bool:
        """Every row left at a ramp: the backbone stopped there and `final` is None."""
        return self.final is None

    def _results(self, sites: Sequence[int]) -> list[RampResult]:
        results = [self.ramps[s] for s in sites]
        if any(r.rows is not None for r in results):
            raise ValueError("rows were dropped during this batch: its ramps cover different rows (see RampResult.rows)")
        score_all(results)
        return results

    def conf_matrix(self, sites: Sequence[int]) -> np.ndarray:
        """[B, len(sites)] confidences of the given (active) sites (a batch without drops)."""
        return np.stack([r.conf for r in self._results(sites)], axis=1)

    def pred_matrix(self, sites: Sequence[int]) -> np.ndarray:
        """[B, len(sites)] answers of the given (active) sites (a batch without drops)."""
        return np.stack([r.pred for r in self._results(sites)], axis=1)


class _AllLeft(Exception):
    """Raised from a hook when every row of the batch has left: the forward stops there."""


def _cut(x: Any, n: int, idx: torch.Tensor) -> Any:
    """`x` with its rows cut to `idx` where it is a tensor (or a tuple/list of them) of `n` rows."""
    if type(x) is torch.Tensor or torch.is_tensor(x):
        return x.index_select(0, idx) if x.dim() and x.shape[0] == n else x
    if isinstance(x, (tuple, list)):
        return type(x)(_cut(v, n, idx) for v in x)
    return x


class _Call:
    """What the hooks need during one forward on one thread."""

    __slots__ = ("active", "results", "callback", "mask", "weights", "stamps", "pool", "detect", "rows", "size",
                 "idx", "cutters")

    def __init__(self, active: frozenset[int], callback: Any, mask: torch.Tensor | None,
                 weights: torch.Tensor | None, stamps: Any, pool: bool = False, detect: bool = False) -> None:
        self.active = active
        self.results: list[RampResult] = []
        self.callback = callback
        self.mask = mask
        self.weights = weights  # text token weights for mean ramps, once per batch
        self.stamps = stamps  # per site: the clock when its module ended, before its ramp
        self.pool = pool  # give each ramp's result the site's pooled features
        self.detect = detect  # and the difference detector's (`pooled_features`)
        # after a drop: the kept rows' original indices (numpy, and as a tensor for indexing), the
        # original batch size, and the pre-hooks that cut full-batch arguments of later sites
        self.rows: np.ndarray | None = None
        self.size = 0
        self.idx: torch.Tensor | None = None
        self.cutters: list[Any] = []

    def drop(self, keep: np.ndarray, output: Any, n: int, first_later: int, modules: Sequence[nn.Module],
             local: threading.local) -> Any:
        """Keep only the rows `keep` (bool over the `n` current rows) from here on: the site's
        output cut to them (what the hook returns), the per-call mask and token weights cut alike,
        and on the first drop pre-hooks put on every later site's module (removed by `forward`)."""
        keep = np.asarray(keep, dtype=bool).reshape(-1)
        if keep.size != n:
            raise ValueError(f"a ramp callback returned a keep mask of {keep.size} rows for {n} rows")
        if keep.all():
            return None
        if not keep.any():
            raise _AllLeft()
        here = torch.from_numpy(np.flatnonzero(keep))  # kept rows among the current ones
        if self.rows is None:  # the first drop in this call
            self.size = n
            self.rows = np.flatnonzero(keep)
            call = self

            def cut_args(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
                # full-batch tensors computed before the drop (an encoder's attention mask); only
                # this call's (the model may be running a batch on another thread too)
                if getattr(local, "call", None) is not call:
                    return None
                return _cut(args, call.size, call.idx), {k: _cut(v, call.size, call.idx) for k, v in kwargs.items()}

            self.cutters = [m.register_forward_pre_hook(cut_args, with_kwargs=True) for m in modules[first_later:]]
        else:
            self.rows = self.rows[keep]
        self.idx = torch.from_numpy(self.rows)
        if self.mask is not None:
            self.mask = self.mask.index_select(0, here)
        if self.weights is not None:
            self.weights = self.weights.index_select(0, here)
        return _cut(output, n, here)


RampCallback = Callable[[RampResult], None]


class EarlyExitModel(nn.Module):
    """Backbone + ramps at `sites`; `active` picks which ramps run.

    `label_map` maps the backbone's class index to the target's (e.g. 10 CIFAR classes to
    vehicle/not): ramps predict in the target space and the original answer is mapped too.
    """

    def __init__(
        self,
        backbone: nn.Module,
        sites: Sequence[Site],
        ramps: Sequence[nn.Module],
        active: Iterable[int] = (),
        confidence: str | ConfidenceFn = "max_softmax",
        label_map: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if len(sites) != len(ramps):
            raise ValueError(f"{len(sites)} sites but {len(ramps)} ramps")
        if [s.index for s in sites] != list(range(len(sites))):
            raise ValueError("sites must be numbered 0..S-1 in execution order")
        self.backbone = backbone
        self.ramps = nn.ModuleList(ramps)
        self.sites = tuple(sites)
        self.confidence = confidence_fn(confidence)
        self._score = scorer(self.confidence)
        self._fast = [fast_for(r) for r in self.ramps]
        self._feats = [features_for(r) for r in self.ramps]
        self._detecting = [detecting_for(r, f) for r, f in zip(self.ramps, self._fast)]
        self._token_sites = self._needing_token_weights()
        # a buffer, so that `.to(device)` moves it with the model (not saved: bundles keep it in JSON)
        self.register_buffer("label_map", None if label_map is None else torch.as_tensor(list(label_map), dtype=torch.long),
                             persistent=False)
        self._active: tuple[int, ...] = ()
        self._local = threading.local()  # per-call state (`_Call`): a server may run forwards on threads
        modules = dict(backbone.named_modules())
        missing = [s.name for s in sites if s.name not in modules]
        if missing:
            raise ValueError(f"sites {missing} are not modules of the backbone")
        self._modules_at = [modules[s.name] for s in sites]
        self._hooks = [self._make_hook(s) for s in sites]
        # Per site: how many running calls need its hook, and the handle while attached. Calls on
        # several threads share one hook per site (it serves each thread's own active set).
        self._hook_users = [0] * len(sites)
        self._handles: dict[int, Any] = {}
        self._hook_lock = threading.Lock()
        self.set_active(active)
        self.eval()

    # ---------------------------------------------------------------- active set
    @property
    def active(self) -> tuple[int, ...]:
        return self._active

    def set_active(self, sites: Iterable[int]) -> None:
        """Choose the ramps that run from the next forward on (takes effect atomically)."""
        idx = tuple(sorted({int(s) for s in sites}))
        if idx and (idx[0] < 0 or idx[-1] >= len(self.sites)):
            raise ValueError(f"site index out of range 0..{len(self.sites) - 1}: {list(idx)}")
        with self._hook_lock:  # the active set keeps its hooks attached between calls
            self._count(idx, +1)
            self._count(self._active, -1)
            self._active = idx

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> "EarlyExitModel":
        """`.to(device)`, `.half()`...: the fast ramp functions hold their weights, so they are
        rebuilt from the moved ones (else the ramps would run where the model was built)."""
        out = super()._apply(fn, *args, **kwargs)
        self._fast[:] = [fast_for(r) for r in self.ramps]  # in place: the hooks hold these lists
        self._detecting[:] = [detecting_for(r, f) for r, f in zip(self.ramps, self._fast)]
        return out

    @property
    def num_sites(self) -> int:
        return len(self.sites)

    @property
    def site_modules(self) -> tuple[nn.Module, ...]:
        """The backbone's module at each site, for instruments that hook them (recording)."""
        return tuple(self._modules_at)

    def set_ramp(self, index: int, ramp: nn.Module) -> None:
        """Replace the ramp at a site (a `Ramp`, or any module called as `ramp(h, mask)`)."""
        self.ramps[index] = ramp
        self._fast[index] = fast_for(ramp)
        self._feats[index] = features_for(ramp)
        self._detecting[index] = detecting_for(ramp, self._fast[index])
        self._token_sites = self._needing_token_weights()

    def _needing_token_weights(self) -> frozenset[int]:
        return frozenset(i for i, r in enumerate(self.ramps) if getattr(r, "needs_token_weights", False))

    # ---------------------------------------------------------------- running
    def final_prediction(self, final_output: Any) -> torch.Tensor:
        pred = primary_output(final_output).argmax(dim=-1)
        if self.label_map is not None:
            pred = self.label_map[pred]
        return pred

    def forward(self, inputs: ModelInput, on_ramp: RampCallback | None = None,
                active: Iterable[int] | None = None, stamps: Any = None, pool: bool = False,
                detect: bool = False) -> EarlyExitOutput:
        """Run one batch. `on_ramp` is called once per active ramp, as soon as it has run; it may
        return a boolean array over the ramp's rows, the rows to keep from there on (module doc),
        or None to keep them all.

        `active` overrides the active set for this call only (e.g. all sites when recording).
        `stamps`, an array indexed by site, receives `time.perf_counter()` when each active site's
        module ends, before its ramp runs (what a server times its stages by, at no extra hook).
        `pool`: each ramp's result also carries the site's features (`pooled`: a linear head's
        input, else the spatial mean; for heads that keep learning). `detect`: each carries
        `sums`, the site's `pooled_features` (the learned exit rule's difference detector), from
        the ramp's own pooling where it pools. Off, the hooks do no extra work.
        """
        act = self._active if active is None else tuple(sorted({int(s) for s in active}))
        if act and (act[0] < 0 or act[-1] >= len(self.sites)):
            raise ValueError(f"site index out of range 0..{len(self.sites) - 1}: {list(act)}")
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        weights = token_weights(mask) if mask is not None and self._token_sites.intersection(act) else None
        call = self._local.call = _Call(frozenset(act), on_ramp, mask, weights, stamps, pool, detect)
        self._attach(act)
        try:
            with torch.inference_mode():
                out = call_model(self.backbone, inputs)
        except _AllLeft:  # every row left at a ramp: nothing more to compute
            return EarlyExitOutput(None, torch.zeros(0, dtype=torch.long), {r.site: r for r in call.results},
                                   np.zeros(0, dtype=np.int64))
        finally:
            self._detach(act)
            self._local.call = None
            for h in call.cutters:
                h.remove()
        return EarlyExitOutput(out, self.final_prediction(out), {r.site: r for r in call.results}, call.rows)

    def _attach(self, sites: tuple[int, ...]) -> None:
        with self._hook_lock:
            self._count(sites, +1)

    def _detach(self, sites: tuple[int, ...]) -> None:
        with self._hook_lock:
            self._count(sites, -1)

    def _count(self, sites: tuple[int, ...], delta: int) -> None:
        """Hook users per site (the active set holds one, each running call one): a hook is
        attached while its count is positive. Call with the lock held."""
        for s in sites:
            n = self._hook_users[s] = max(0, self._hook_users[s] + delta)  # remove_hooks may have reset it
            if n and s not in self._handles:
                self._handles[s] = self._modules_at[s].register_forward_hook(self._hooks[s])
            elif not n and s in self._handles:
                self._handles.pop(s).remove()

    def _make_hook(self, site: Site) -> Callable:
        index, name, local = site.index, site.name, self._local
        fasts, feats, detecting, score, clock = self._fast, self._feats, self._detecting, self._score, time.perf_counter

        modules = self._modules_at

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            call = getattr(local, "call", None)
            if call is None or index not in call.active:
                return None
            if call.stamps is not None:
                call.stamps[index] = clock()
            h = output if type(output) is torch.Tensor else primary_output(output)
            if call.detect:
                logits, sums = detecting[index](h, call)
                result = RampResult(index, name, logits, score, call.rows)
                result.sums = sums
            else:
                result = RampResult(index, name, fasts[index](h, call), score, call.rows)
            if call.pool:
                result.pooled = feats[index](h, call)
            call.results.append(result)
            if call.callback is not None:
                keep = call.callback(result)
                if keep is not None:  # rows leave the batch here (early stop)
                    return call.drop(keep, output, h.shape[0], index + 1, modules, local)
            return None  # the backbone's computation unaltered

        return hook

    def remove_hooks(self) -> None:
        """Detach from the backbone (it is then exactly the bare model again)."""
        with self._hook_lock:
            for h in self._handles.values():
                h.remove()
            self._handles = {}
            self._hook_users = [0] * len(self.sites)
            self._active = ()


def drop_rows_work(ee: EarlyExitModel, inputs: ModelInput, atol: float = 1e-4) -> str | None:
    """Whether dropping rows between sites gives the answers the full batch gives on `inputs` (a
    batch of at least two, texts of different lengths for an encoder): the first row dropped at
    the first site, the others' final outputs compared with the full batch's. None when they
    agree, else why not (a model that uses a full-batch tensor after a site; see the module doc)."""
    with torch.inference_mode():
        full = ee(inputs, active=())
        ref = primary_output(full.final).float()
        if ref.shape[0] < 2:
            return "the check needs a batch of at least two inputs"

        def leave_first(r: RampResult) -> np.ndarray:
            keep = np.ones(r.logits.shape[0], dtype=bool)
            keep[0] = False
            return keep

        try:
            cut = ee(inputs, on_ramp=leave_first, active=(0,))
        except Exception as e:  # noqa: BLE001 - any failure means: not for this model
            return f"the model fails with rows dropped: {type(e).__name__}: {e}"
    got = primary_output(cut.final).float()
    if got.shape[0] != ref.shape[0] - 1 or not torch.allclose(got, ref[1:], rtol=1e-3, atol=atol):
        return "the kept rows' outputs differ from the full batch's"
    return None
