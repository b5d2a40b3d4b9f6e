"""Sites: the candidate ramp positions of a model.

A ramp placed at a *cut vertex* of the model's dataflow graph (a node every path from the input
to the output passes through) sees everything the model has computed so far (notes §2.1). We
trace the model with `torch.fx`, count paths, keep the nodes on every path, and map them back to
module outputs: a site is a sub-module whose output is a cut vertex. Only "blocks" count (modules
with sub-modules, such as a residual block or an MBConv block), so a ResNet gets one site per
residual block rather than one per conv/bn/relu of its stem; where a container's output is its
last child's, the innermost module names the site. Models built only of leaf layers fall back to
the leaf layers whose outputs are cut vertices.

Hugging Face BERT-style encoders are not fx-traceable in general and have an obvious structure:
one site per encoder layer.

A model that cannot be traced gets an `UntraceableModelError` naming the construct and the way
out: pass the site names by hand (`find_sites(model, example, names=[...])`).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import fx, nn

ModelInput = Any  # a tensor, or a mapping of keyword tensors (HF models)


@dataclass(frozen=True)
class Site:
    """A candidate ramp position: site `index` (execution order) at module `name`."""

    index: int
    name: str
    shape: tuple[int, ...]  # output shape per input, batch dimension dropped

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Site":
        return cls(int(d["index"]), str(d["name"]), tuple(int(s) for s in d["shape"]))


class UntraceableModelError(ValueError):
    """torch.fx could not trace the model, so sites must be named by hand."""


def call_model(model: nn.Module, inputs: ModelInput) -> Any:
    """Call a model with a tensor or with keyword tensors."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def primary_output(out: Any) -> torch.Tensor:
    """The tensor a module produced: the first element of a tuple, `.logits`/`.last_hidden_state`."""
    if torch.is_tensor(out):
        return out
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    for attr in ("logits", "last_hidden_state"):
        v = getattr(out, attr, None)
        if torch.is_tensor(v):
            return v
    raise TypeError(f"cannot find a tensor in a module output of type {type(out).__name__}")


# ---------------------------------------------------------------------------------------------
# Hugging Face encoders

_ENCODER_LISTS = ("encoder.layer", "transformer.layer", "encoder.layers", "layers")


def hf_encoder_layers(model: nn.Module) -> list[str] | None:
    """Names of the encoder layers of a BERT-style model (one site each), or None."""
    has_config = any(hasattr(m, "config") and hasattr(getattr(m, "config"), "model_type") for m in model.modules())
    if not has_config:
        return None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and any(name == s or name.endswith("." + s) for s in _ENCODER_LISTS):
            return [f"{name}.{i}" for i in range(len(mod))]
    return None


# ---------------------------------------------------------------------------------------------
# torch.fx cut vertices

class _RecordingTracer(fx.Tracer):
    """A tracer that remembers which graph node each module call produced."""

    def __init__(self) -> None:
        super().__init__()
        self.module_outputs: dict[str, list[fx.Node]] = {}
        self.call_counts: dict[str, int] = {}
        self.non_leaf: set[str] = set()

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        name = self.path_of_module(m)
        before = set(self.graph.nodes)  # to spot pass-through modules (nn.Identity & co)
        out = super().call_module(m, forward, args, kwargs)
        self.call_counts[name] = self.call_counts.get(name, 0) + 1
        if not self.is_leaf_module(m, name):
            self.non_leaf.add(name)
        node = None
        if isinstance(out, fx.Proxy):
            node = out.node
        elif isinstance(out, (tuple, list)) and out and isinstance(out[0], fx.Proxy):
            node = out[0].node
        if node is not None and node not in before:
            self.module_outputs.setdefault(name, []).append(node)
        return out


def _describe_trace_failure(exc: BaseException, model: nn.Module) -> str:
    """Where in the user's code tracing failed, e.g. 'models.py:12 in forward: `if x.sum() > 0:`'."""
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if "/torch/" not in f.filename.replace("\\", "/")]
    where = ""
    if user:
        f = user[-1]
        where = f" at {f.filename}:{f.lineno} in {f.name}: `{(f.line or '').strip()}`"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{where}"


def trace(model: nn.Module) -> tuple[fx.Graph, _RecordingTracer]:
    tracer = _RecordingTracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:  # noqa: BLE001 - any failure means "cannot trace"
        construct = _describe_trace_failure(e, model)
        raise UntraceableModelError(
            f"cannot trace {type(model).__name__} with torch.fx ({construct}). Data-dependent "
            "control flow, calls into non-torch code or dynamic shapes stop symbolic tracing. "
            "Name the sites by hand instead: find_sites(model, example, names=['layer1', 'layer2', ...]) "
            "in Python, or `apparate prepare ... --sites layer1,layer2,...` (module names as in "
            "model.named_modules(), any order)") from e
    return graph, tracer


def cut_vertices(graph: fx.Graph) -> set[fx.Node]:
    """Nodes on every path from an input (placeholder) to the output, by exact path counting.

    n(v) = paths input->v times paths v->output; v is a cut vertex iff n(v) equals the total.
    Python integers make the count exact however many paths a deep residual net has.
    """
    nodes = list(graph.nodes)
    out_node = next((n for n in nodes if n.op == "output"), None)
    if out_node is None:
        return set()
    meta = _metadata_nodes(nodes)
    fwd: dict[fx.Node, int] = {}
    for n in nodes:  # graph order is topological
        if n in meta:
            fwd[n] = 0  # x.size(0) feeding a later view() is not a path the data takes
        else:
            fwd[n] = 1 if n.op == "placeholder" else sum(fwd.get(i, 0) for i in n.all_input_nodes)
    bwd: dict[fx.Node, int] = {}
    for n in reversed(nodes):
        bwd[n] = 1 if n is out_node else sum(bwd.get(u, 0) for u in n.users)
    total = fwd[out_node]
    if total == 0:
        return set()
    return {n for n in nodes if n.op not in ("placeholder", "output") and fwd[n] * bwd[n] == total}


_META_METHODS = {"size", "dim", "numel", "type", "get_device"}
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}


def _metadata_nodes(nodes: list[fx.Node]) -> set[fx.Node]:
    """Nodes that only compute shapes/dtypes, and everything computed from those alone."""
    meta: set[fx.Node] = set()
    for n in nodes:
        if n.op == "call_method" and n.target in _META_METHODS:
            meta.add(n)
        elif n.op == "call_function" and n.target is getattr and len(n.args) > 1 and n.args[1] in _META_ATTRS:
            meta.add(n)
        elif n.op == "call_function" and n.target is len:
            meta.add(n)
        elif n.op != "output" and n.all_input_nodes and all(i in meta for i in n.all_input_nodes):
            meta.add(n)
    return meta


def _traced_site_names(model: nn.Module) -> list[str]:
    graph, tracer = trace(model)
    cuts = cut_vertices(graph)
    order = {n: i for i, n in enumerate(graph.nodes)}
    final = max((order[n] for n in cuts), default=-1)

    def candidates(names: set[str] | None) -> list[str]:
        by_node: dict[fx.Node, str] = {}
        for name, outs in tracer.module_outputs.items():
            if not name or (names is not None and name not in names):
                continue
            if tracer.call_counts.get(name, 0) != 1 or len(outs) != 1:
                continue  # a module run twice has no single position
            node = outs[0]
            if node not in cuts or order[node] >= final:
                continue  # the model's own output is the final exit, not a site
            prev = by_node.get(node)
            # Same output node: keep the innermost module, e.g. layer1.2 over layer1.
            if prev is None or name.startswith(prev + "."):
                by_node[node] = name
        return [name for node, name in sorted(by_node.items(), key=lambda kv: order[kv[0]])]

    modules = dict(model.named_modules())

    def is_block(name: str) -> bool:
        # A residual/MBConv-style block holds several parameterised layers; a conv that merely
        # wraps a padding module does not.
        kids = [c for c in modules[name].children() if any(True for _ in c.parameters())]
        return len(kids) >= 2

    blocks = candidates({n for n in tracer.non_leaf if n in modules and is_block(n)})
    if blocks:
        return blocks
    leaves = candidates(None)
    return leaves[1:] if len(leaves) > 1 else leaves  # the very first layer sees nothing yet


def find_sites(model: nn.Module, example: ModelInput, names: Sequence[str] | None = None) -> list[Site]:
    """Candidate ramp sites of `model`, in execution order, with output shapes from `example`.

    `names` overrides discovery (for models fx cannot trace, or to choose sites yourself).
    """
    if names is not None:
        names = [str(n).strip() for n in names if str(n).strip()]
        if not names:
            raise ValueError("no site names given")
        known = dict(model.named_modules())
        missing = [n for n in names if n not in known]
        if missing:
            sample = ", ".join(list(k for k in known if k)[:12])
            raise ValueError(f"no module named {missing} in {type(model).__name__} (modules include: {sample}, ...)")
        if len(set(names)) != len(names):
            raise ValueError(f"site names repeat: {names}")
    else:
        names = hf_encoder_layers(model)
        if names is None:
            names = _traced_site_names(model)
        if not names:
            raise ValueError(f"found no candidate sites in {type(model).__name__}; name them by hand")
    return _order_and_shape(model, example, list(names))


def _order_and_shape(model: nn.Module, example: ModelInput, names: list[str]) -> list[Site]:
    """Run the example once with hooks: execution order and per-input output shapes."""
    modules = dict(model.named_modules())
    seen: dict[str, tuple[int, tuple[int, ...]]] = {}
    counts: dict[str, int] = {}
    handles = []

    def make_hook(name: str) -> Callable:
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            counts[name] = counts.get(name, 0) + 1
            if name not in seen:
                seen[name] = (len(seen), tuple(primary_output(out).shape[1:]))
        return hook

    for n in names:
        handles.append(modules[n].register_forward_hook(make_hook(n)))
    try:
        with torch.no_grad():
            call_model(model, example)
    finally:
        for h in handles:
            h.remove()
    never = [n for n in names if n not in seen]
    if never:
        raise ValueError(f"modules {never} did not run on the example input, so cannot be sites")
    twice = [n for n in names if counts[n] > 1]
    if twice:
        raise ValueError(f"modules {twice} run more than once per forward, so have no single position")
    ordered = sorted(names, key=lambda n: seen[n][0])
    return [Site(i, n, seen[n][1]) for i, n in enumerate(ordered)]
