"""EarlyExitModel: an untouched backbone plus ramps that run from forward hooks.

The backbone is never modified or re-compiled. A forward hook is attached to a candidate site
only while some call has that site active (a module with no hooks takes PyTorch's fast call
path, so inactive sites cost nothing); the hook checks the calling thread's active set (the
active set is an immutable tuple swapped atomically, so a controller thread can change it between
batches), runs the ramp on the site's output, and calls the per-site callback right away: that is
where a live server releases answers while the batch runs on. Hooks never return a value, so the
backbone's own computation, and hence its final output, is bit-identical to the bare model's.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from apparate.model.ramps import ConfidenceFn, confidence_fn, score
from apparate.model.sites import ModelInput, Site, call_model, primary_output


@dataclass(frozen=True)
class RampResult:
    """One active ramp's answers for a batch."""

    site: int
    name: str
    conf: torch.Tensor  # [B] in [0, 1]
    pred: torch.Tensor  # [B] class index (in the target's label space)
    logits: torch.Tensor  # [B, classes]


@dataclass(frozen=True)
class EarlyExitOutput:
    final: Any  # the backbone's output, exactly as the bare model returns it
    final_pred: torch.Tensor  # [B] the original model's answer (mapped to the target labels)
    ramps: dict[int, RampResult] = field(default_factory=dict)  # active sites, execution order

    def conf_matrix(self, sites: Sequence[int]) -> torch.Tensor:
        """[B, len(sites)] confidences of the given (active) sites."""
        return torch.stack([self.ramps[s].conf for s in sites], dim=1)


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
        self.label_map = None if label_map is None else torch.as_tensor(list(label_map), dtype=torch.long)
        self._active: tuple[int, ...] = ()
        self._local = threading.local()  # per-call state: a server may run forwards on threads
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

    @property
    def num_sites(self) -> int:
        return len(self.sites)

    # ---------------------------------------------------------------- running
    def final_prediction(self, final_output: Any) -> torch.Tensor:
        pred = primary_output(final_output).argmax(dim=-1)
        if self.label_map is not None:
            pred = self.label_map[pred]
        return pred

    def forward(self, inputs: ModelInput, on_ramp: RampCallback | None = None,
                active: Iterable[int] | None = None) -> EarlyExitOutput:
        """Run one batch. `on_ramp` is called once per active ramp, as soon as it has run.

        `active` overrides the active set for this call only (e.g. all sites when recording).
        """
        state = self._local
        act = self._active if active is None else tuple(sorted({int(s) for s in active}))
        if act and (act[0] < 0 or act[-1] >= len(self.sites)):
            raise ValueError(f"site index out of range 0..{len(self.sites) - 1}: {list(act)}")
        state.active = frozenset(act)
        state.results = {}
        state.callback = on_ramp
        state.mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        self._attach(act)
        try:
            with torch.no_grad():
                out = call_model(self.backbone, inputs)
            results = dict(sorted(state.results.items()))
        finally:
            self._detach(act)
            state.active = frozenset()
            state.results = {}
            state.callback = None
            state.mask = None
        return EarlyExitOutput(out, self.final_prediction(out), results)

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
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            state = self._local
            active = getattr(state, "active", None)
            if not active or site.index not in active:
                return None
            h = primary_output(output)
            with torch.no_grad():
                logits = self.ramps[site.index](h, state.mask)
                conf, pred = score(logits, self.confidence)
            result = RampResult(site.index, site.name, conf, pred, logits)
            state.results[site.index] = result
            if state.callback is not None:
                state.callback(result)
            return None  # never alter the backbone's computation

        return hook

    def remove_hooks(self) -> None:
        """Detach from the backbone (it is then exactly the bare model again)."""
        with self._hook_lock:
            for h in self._handles.values():
                h.remove()
            self._handles = {}
            self._hook_users = [0] * len(self.sites)
            self._active = ()
