"""The Python API, a few verbs over the packages below (each imports what it needs when called, so
`import apparate` stays light):

    import apparate
    bundle = apparate.prepare("cifar10-vehicle-resnet56", "bundles/vr56", data_dir="../shared/data")
    result = apparate.compare(bundle, trace="poisson", rate=40, policies=["vanilla", "apparate"])
    print(result.table())
    with apparate.serving(bundle, port=8000) as server:   # OIP v2 over HTTP on 127.0.0.1
        print(server.url)                                  # and server.engine.submit(inputs)

`prepare` takes a zoo workload's name, a `Workload`, or your own `torch.nn.Module` with its
encoder and bootstrap inputs. `compare` replays policies on a recorded stream and an arrival
trace, side by side. `serving` runs the live server in this process until the `with` block ends.
(The verbs are not `replay` and `serve`: those are the subpackages' names.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

PathLike = str | os.PathLike


def prepare(model: Any, out: PathLike, *, data_dir: PathLike | None = None, encode: Callable[[Sequence[Any]], Any] | None = None,
            bootstrap: Any = None, num_classes: int | None = None, progress: bool = True, **options: Any) -> Any:
    """Find ramp sites, train ramps with the model frozen, profile, write a bundle to `out`; return it.

    `model`: a zoo workload name (`apparate prepare --list`), a `Workload`, or an `nn.Module`, which
    then needs `encode` (raw inputs -> model inputs), `bootstrap` (a `Stream` of inputs) and
    `num_classes`. `options` are `apparate.model.prepare.PrepareOptions` fields (`bootstrap` as a
    count for workloads, `ramp`, `threads`, `max_batch`, `seed`, ...)."""
    from apparate.model.prepare import PrepareOptions, prepare_model, prepare_workload

    log = print if progress else (lambda _s: None)
    if isinstance(model, str):
        from apparate.zoo import get_workload

        model = get_workload(model, data_dir, progress=progress)
    if hasattr(model, "streams") and hasattr(model, "bootstrap_stream"):  # a Workload
        if isinstance(bootstrap, int):
            options["bootstrap"] = bootstrap
        return prepare_workload(model, out, PrepareOptions(progress=progress, **options), log=log)
    if encode is None or bootstrap is None or num_classes is None:
        raise ValueError("preparing your own model needs encode=, bootstrap= (a Stream) and num_classes=")
    ramp = options.pop("ramp", "pool")
    return prepare_model(model, encode, bootstrap, out, num_classes=num_classes, ramp=ramp,
                         options=PrepareOptions(progress=progress, ramp=ramp, **options), log=log)


@dataclass
class Comparison:
    """Every policy's metrics on the same recording and trace (`apparate.replay.summary.Metrics`)."""

    metrics: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)
    experiment: Any = None  # the full `bench.experiment.ExperimentResult` (runs, for plots)

    def table(self) -> str:
        from apparate.bench.report import comparison_table

        return comparison_table(list(self.metrics.values()))


def compare(bundle: Any, stream: str | None = None, *, policies: Sequence[str] | None = None, trace: str = "fixed",
           rate: float | None = None, n: int | None = None, data_dir: PathLike | None = None, settings: Any = None,
           progress: bool = False, **spec: Any) -> Comparison:
    """Replay policies (default: all that apply) on `bundle`'s model over a stream (default: the
    workload's drifting one, or your own: `csv:PATH`, `images:PATH`, `video:PATH`) and an arrival
    trace (`fixed`, `poisson`, `gamma`, `azure`, `file:PATH`, `azure-functions:PATH[:FUNCTION]`) at
    `rate` (synthetic default 30/s; a real trace keeps its own unless given): the recording is
    made once and cached.
    `bundle` is a `Bundle` or its directory; `settings` changes to the settings of the workload's
    kind (a dict, e.g. `{"accuracy_constraint": 0.02}`, over `core.settings.Settings.for_kind`,
    as the server applies its flags) or a whole `Settings`, used as given; `spec` other
    `bench.experiment.ExperimentSpec` fields (`slo_ms`, `max_batch`, `batching`, ...)."""
    from apparate.bench.experiment import ExperimentSpec, run_experiment

    from apparate.model.bundle import read_manifest

    path = str(getattr(bundle, "path", bundle))
    manifest = read_manifest(path)
    workload = manifest.get("workload") or manifest.get("model", {}).get("workload", "custom")
    result = run_experiment(ExperimentSpec(workload=workload, data_dir=None if data_dir is None else str(data_dir),
                                           bundle=path, stream=stream, n=n, trace=trace, rate=rate,
                                           settings=settings or {}, policies=tuple(policies) if policies else None,
                                           progress=progress, **spec),
                            log=print if progress else (lambda _s: None))
    return Comparison({m.policy: m for m in result.metrics}, result.info, result)


def serving(bundle: Any, *, port: int = 0, data_dir: PathLike | None = None, **options: Any) -> Any:
    """The live server in this process, on 127.0.0.1, already started: a context manager
    (`with apparate.serving(bundle) as server: ... server.url`); `server.engine.submit(inputs)`
    serves without HTTP. `port` 0 takes a free one. `options` are the fields of
    `apparate.serve.server.ServeOptions` (the `apparate serve` flags: policy, slo_ms, max_batch,
    ramp_budget, state_dir, threads, ...)."""
    from apparate.serve.server import ServeOptions, serve_in_thread

    return serve_in_thread(ServeOptions(bundle=str(getattr(bundle, "path", bundle)), port=port,
                                        data_dir=None if data_dir is None else str(data_dir), **options))
