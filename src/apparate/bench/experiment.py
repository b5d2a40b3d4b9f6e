"""One comparison run, end to end: a bundle (prepared once, cached), a recording of a stream
(recorded once, cached), an arrival trace, and every policy replayed on the same recording and
trace. Used by `apparate bench compare`, `bench sweep` and `demo`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from apparate.core.recording import Recording
from apparate.core.settings import Settings
from apparate.paths import cache_dir
from apparate.core.adjust import BudgetPoint
from apparate.policies.catalog import POLICIES, PolicyInputs, RampFamily, all_ramps_budget, family_of, make_policy
from apparate.policies.heads import LiveHeadsPolicy

from apparate.zoo import trace_specs
from apparate.core.batchers import Batcher, ClockworkBatcher, TFServingBatcher
from apparate.core.serving_rules import BATCHINGS, SERVE_SUFFIX, ServingRules
from apparate.replay.summary import Metrics, summarize
from apparate.replay.simulator import RunResult, replay

Log = Callable[[str], None]

DEFAULT_POLICIES = ("vanilla", "static", "apparate", "apparate-all", "apparate-learned", "branchynet", "branchynet+", "branchynet-opt",
                    "branchynet+opt", "optimal", "optimal-cost")
TEXT_POLICIES = ("deebert", "deebert+", "deebert-opt", "deebert+opt")


@dataclass(frozen=True)
class ExperimentSpec:
    workload: str
    data_dir: str | None = None
    bundle: str | None = None  # an existing bundle directory; default: prepared into the cache
    deebert_bundle: str | None = None
    stream: str | None = None  # default: camera-day (images), drift (text); or video:, images:, csv:PATH
    n: int | None = None  # inputs to replay (default: the stream's own size)
    seed: int = 0
    trace_seed: int | None = None  # arrivals' own seed (default `seed`): a real trace is rotated by it
    trace: str = "fixed"  # fixed | poisson | gamma | azure | file:PATH | azure-functions:PATH[:FUNCTION]
    rate: float | None = 30.0  # requests per second; None: a real trace's own rate (synthetic: 30)
    fps: float | None = None  # video:PATH: a fixed trace at this rate (default: the frames' own times)
    cv: float = 2.0  # for bursty
    slo_ms: float | None = None  # default: slo_x times the bare model's batch-1 latency
    slo_x: float = 4.0
    batching: str = "clockwork"  # or tfserving; with +serve, the live server's rules over it (serving_rules)
    max_batch: int = 16
    batch_timeout_ms: float = 5.0
    settings: Settings | Mapping[str, Any] = field(default_factory=dict)
    # changes to the workload kind's settings (`Settings.for_kind`), applied once the kind is known
    # (the bundle's), as a server applies them: the flags and `--set`; or a whole Settings, as given
    kind: str | None = None  # 'image' or 'text'; default: the bundle's (needed with given recordings, `families`)
    policies: tuple[str, ...] | None = None  # default: all that apply
    bootstrap: int | None = None
    stream_bootstrap: float = 0.0  # > 0: place Apparate's ramps on this first share of the stream (the
    # paper's bootstrap), which is then not replayed; 0: on the bundle's held-out bootstrap inputs
    profile_max_batch: int | None = None  # largest batch profiled when preparing (default: max(64, max_batch))
    threads: int | None = None
    ramp_costs: str = "prepared"  # or "served": the ramp costs a server calibrates here (bench/served_costs.py)
    profile: str = "prepared"  # or "here": the whole profile re-timed on this machine first (served_costs.profile_here)
    progress: bool = True

    def settings_for(self, kind: str) -> Settings:
        """The settings the policies run with on a workload of this kind."""
        s = self.settings
        return s if isinstance(s, Settings) else Settings.for_kind(kind, **s)


@dataclass
class ExperimentResult:
    spec: ExperimentSpec
    metrics: list[Metrics]
    runs: list[RunResult]
    info: dict[str, Any]
    phases: np.ndarray | None = None
    settings: Settings = field(default_factory=Settings)  # what the policies ran with


# Part of the cache key of prepared bundles: bump it when preparation changes what it makes (the
# profile's ramp costs, default bootstrap sizes), so that stale bundles are not reused.
PREPARATION_VERSION = 2


def _bundle_dir(spec: ExperimentSpec, ramp: str | None) -> Path:
    tag = (f"{spec.workload}-{ramp or 'default'}-b{spec.bootstrap or 'default'}-s{spec.seed}"
           f"-p{spec.profile_max_batch or 'default'}-v{PREPARATION_VERSION}")
    return cache_dir("bundles") / tag


def load_or_prepare(workload: str, data_dir: str | None, bundle: str | None, ramp: str | None, spec: ExperimentSpec,
                    log: Log) -> Any:
    """Load `bundle`, else the cached bundle for this workload, else prepare it (once)."""
    from apparate.model.bundle import BundleError
    from apparate.zoo.bundles import load_bundle
    from apparate.model.prepare import PrepareOptions, prepare_workload
    from apparate.zoo.workloads import get_workload

    path = Path(bundle) if bundle else _bundle_dir(spec, ramp)
    if (path / "manifest.json").exists():
        try:
            return load_bundle(path, data_dir=data_dir)
        except BundleError as e:
            if bundle:  # the user's bundle: do not touch it
                raise
            log(f"cached bundle {path} is unusable ({e}); preparing it again")
            shutil.rmtree(path, ignore_errors=True)
    elif bundle:
        raise ValueError(f"no bundle at {bundle} (no manifest.json)")
    log(f"preparing {workload} ({ramp or 'default'} ramps) into {path} (once; cached)")
    wl = get_workload(workload, data_dir, progress=spec.progress)
    opts = PrepareOptions(bootstrap=spec.bootstrap, ramp=ramp, seed=spec.seed, threads=spec.threads,
                          max_batch=spec.profile_max_batch or max(64, spec.max_batch), progress=spec.progress)
    prepare_workload(wl, path, opts, log=log)
    return load_bundle(path, data_dir=data_dir)


def load_or_record(bundle: Any, stream_name: str, n: int | None, seed: int, spec: ExperimentSpec, log: Log,
                   features: bool = False) -> Recording:
    from apparate.zoo.own_streams import resolve_stream, stream_key

    from .record import bundle_id, check_recording_matches, record_stream

    tag = stream_key(stream_name, spec.fps)
    # image recordings carry each site's feature movement (core.evidence): "-m2" keys them apart
    # (2: movement of the spatial sums, in plain floats; recordings keyed "-m" hold the older one)
    moves = "-m2" if getattr(bundle.workload, "kind", None) == "image" else ""
    moves += "f" if features else ""  # and what the ramps' heads read (heads that keep learning)
    key = f"{bundle_id(bundle.path)}-{tag}-n{n or 'all'}-s{seed}{moves}.npz"
    path = cache_dir("recordings") / key
    if path.exists():
        try:
            rec = Recording.load(path)
            check_recording_matches(rec, bundle.path)
            return rec
        except ValueError as e:
            log(f"cached recording {path} is unusable ({e}); recording again")
    stream = resolve_stream(bundle.workload, stream_name, seed=seed, n=n, fps=spec.fps)
    log(f"recording {len(stream)} inputs of stream {stream_name!r} with every ramp active (once; cached)")
    rec = record_stream(bundle, stream, progress=spec.progress, threads=spec.threads, features=features)
    rec.save(path)
    return rec


def default_stream(kind: str) -> str:
    """The stream a comparison replays when none is named: a camera day, or drifting text."""
    return "camera-day" if kind == "image" else "drift"


def bundle_and_recording(spec: ExperimentSpec, log: Log) -> tuple[Any, str, Recording]:
    """The workload's light-ramp bundle and its recording of the spec's stream (both cached)."""
    bundle = load_or_prepare(spec.workload, spec.data_dir, spec.bundle, None, spec, log)
    stream = spec.stream or default_stream(bundle.workload.kind)
    return bundle, stream, load_or_record(bundle, stream, spec.n, spec.seed, spec, log)


def make_trace(spec: ExperimentSpec, n: int) -> trace_specs.Fitted:
    """The spec's arrivals for n inputs: synthetic at its rate, or a real trace (rescaled to the
    rate when one is given) cut or repeated to n; `.note` says which."""
    seed = spec.seed if spec.trace_seed is None else spec.trace_seed
    fitted = trace_specs.make(spec.trace, n=n, rate=spec.rate, seed=seed, cv=spec.cv, data_dir=spec.data_dir)
    if spec.trace_seed is not None and trace_specs.is_real(spec.trace) and fitted.times.size > 2:
        # another draw of a real trace: its gaps, in order, from a seeded point on (cyclically)
        gaps = np.diff(fitted.times)
        k = int(np.random.default_rng(spec.trace_seed).integers(gaps.size))
        times = np.concatenate([[0.0], np.cumsum(np.roll(gaps, -k))])
        fitted = replace(fitted, times=times, note=f"{fitted.note}, rotated to start at gap {k}")
    return fitted


def make_batcher(spec: ExperimentSpec) -> Batcher:
    """The spec's batcher; a `+serve` name wraps it in the live server's rules, configured as
    `apparate serve` configures them (shedding on), so the replay decides as the server would."""
    kind, serve = spec.batching, spec.batching.endswith(SERVE_SUFFIX)
    if serve:
        kind = kind[: -len(SERVE_SUFFIX)]
    if kind == "clockwork":
        inner: Batcher = ClockworkBatcher(spec.max_batch)
    elif kind == "tfserving":
        inner = TFServingBatcher(spec.max_batch, spec.batch_timeout_ms, max_enqueued_batches=64)
    else:
        raise ValueError(f"unknown batching {spec.batching!r}: one of {', '.join(BATCHINGS)}")
    return ServingRules(inner, shed=True) if serve else inner


def run_experiment(spec: ExperimentSpec, log: Log = print, families: dict[str, RampFamily] | None = None,
                   phases: np.ndarray | None = None) -> ExperimentResult:
    """Replay every policy on the same recording and trace. `families` skips bundles and
    recordings (tests and synthetic runs)."""
    from apparate.zoo.own_streams import check_stream
    from apparate.zoo.video import is_video_stream

    info: dict[str, Any] = {"workload": spec.workload}
    if families is None:
        check_stream(spec.stream)  # an unreadable file or malformed row fails before any preparation
        trace_specs.check(spec.trace, spec.data_dir)  # and so does a malformed trace
        families = {}
        light = load_or_prepare(spec.workload, spec.data_dir, spec.bundle, None, spec, log)
        if spec.profile == "here":  # every policy, vanilla included, replays on this machine's costs
            from .served_costs import profile_here

            light.profile = profile_here(light, spec.max_batch, spec.threads, log=log)
        elif spec.profile != "prepared":
            raise ValueError(f"profile must be 'prepared' or 'here', got {spec.profile!r}")
        kind = spec.kind or light.kind
        stream = spec.stream or default_stream(kind)
        rec = load_or_record(light, stream, spec.n, spec.seed, spec, log)
        families["light"] = RampFamily(light.recording, rec, light.profile)
        bundle = light
        info.update(stream=stream, bundle=str(light.path), ramp=light.specs[0].kind if light.specs else "?")
        if "per_input_phase" in rec.meta:
            phases = np.asarray(rec.meta["per_input_phase"])
        wants = spec.policies or (DEFAULT_POLICIES + (TEXT_POLICIES if kind == "text" else ()))
        if any(family_of(p) == "deebert" for p in wants):
            deb = load_or_prepare(spec.workload, spec.data_dir, spec.deebert_bundle, "deebert", spec, log)
            drec = load_or_record(deb, stream, spec.n, spec.seed, spec, log)
            # one clock for both: the same backbone, timed once (the light bundle's measurement)
            families["deebert"] = RampFamily(deb.recording, drec, deb.profile.with_backbone_of(light.profile))
        if any(family_of(p) == "heads" for p in wants):
            frec = load_or_record(light, stream, spec.n, spec.seed, spec, log, features=True)
            families["heads"] = RampFamily(light.recording, frec, light.profile)
    else:
        kind = spec.kind
        bundle = None
        if spec.ramp_costs != "prepared" or spec.profile != "prepared":
            raise ValueError("ramp_costs='served' and profile='here' time a bundle: run it on a bundle, not given recordings")
        if kind is None and not isinstance(spec.settings, Settings):
            raise ValueError("given recordings, the experiment needs the workload's kind ('image' or 'text') "
                             "for its settings: ExperimentSpec(kind=...)")
        wants = spec.policies or DEFAULT_POLICIES
    settings = spec.settings_for(kind or "image")  # no kind: spec.settings is a whole Settings
    unknown = [p for p in wants if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; choose from {', '.join(POLICIES)}")

    n0 = families["light"].evaluation.num_inputs
    n = n0 if spec.n is None else min(spec.n, n0)
    # Every policy sees exactly the replayed inputs (the opt variants are tuned on them).
    k = int(round(spec.stream_bootstrap * n))
    if not 0 <= k < n:
        raise ValueError(f"stream_bootstrap must leave inputs to replay, got {spec.stream_bootstrap}")
    families = {name: RampFamily(f.evaluation.take(slice(0, k)) if k else f.bootstrap, f.evaluation.take(slice(k, n)),
                                 f.profile) for name, f in families.items()}
    if phases is not None:
        phases = phases[k:]
    n -= k
    light = families["light"]
    fitted = make_trace(spec, n)
    arrivals = fitted.times
    if trace_specs.is_real(spec.trace):
        log(f"trace {fitted.note}")
    info["trace"] = fitted.note
    frame_times = light.evaluation.meta.get("per_input_timestamp")
    if is_video_stream(spec.stream) and not spec.fps and frame_times:
        # your footage arrives as it was filmed: every frame at its own time
        arrivals = np.asarray(frame_times[k:k + n], dtype=np.float64) - float(frame_times[k])
        info["trace"] = "frame times"
        span = float(arrivals[-1]) if arrivals.size > 1 else 0.0
        fitted = trace_specs.Fitted(arrivals, "frame times", "frame times",
                                    (arrivals.size - 1) / span if span > 0 else fitted.rate)
    lengths = light.evaluation.lengths
    # text: 90th-percentile tokens, so that the SLO is attainable for nearly every input alone
    typical = None if lengths is None else float(np.percentile(lengths, 90))
    slo = spec.slo_ms or spec.slo_x * light.profile.vanilla(1, typical)
    batcher = make_batcher(spec)
    vanilla_run = replay(light.evaluation, arrivals, light.profile, make_policy("vanilla", PolicyInputs(light)),
                         batcher, slo)
    serving = serving_point(vanilla_run, lengths)
    inputs = PolicyInputs(light, settings, families.get("deebert"), families.get("heads"), seed=spec.seed, serving=serving)
    info.update(inputs=n, bootstrap=f"first {k} of the stream" if k else "held out", trace=info["trace"], rate=round(fitted.rate, 4), slo_ms=round(slo, 3), batching=spec.batching,
                max_batch=spec.max_batch, accuracy_constraint=settings.accuracy_constraint,
                ramp_budget=settings.ramp_budget, candidate_sites=light.profile.num_sites,
                vanilla_ms_batch1=round(light.profile.vanilla(1), 3),
                serving_batch=serving[0], serving_length=None if serving[1] is None else round(serving[1], 1))
    if "apparate-all" in wants:
        info["all_ramps_budget"] = round(all_ramps_budget(light.profile), 4)
    costs = _ServedCosts(spec, bundle, settings, log)
    info["ramp_costs"] = spec.ramp_costs
    info["profile"] = spec.profile
    metrics, runs = [], []
    for name in wants:
        fam = families.get(family_of(name), light)
        if name == "vanilla":
            run = vanilla_run
        else:
            pol_inputs = inputs
            served = costs.profile(name) if family_of(name) != "deebert" else None
            if served is not None:  # the same inputs and trace; ramps charged what they cost served
                fam = RampFamily(fam.bootstrap, fam.evaluation, served)
                pol_inputs = replace(inputs, light=RampFamily(light.bootstrap, light.evaluation, served))
            policy = make_policy(name, pol_inputs)
            run = replay(fam.evaluation, arrivals, fam.profile, policy, batcher, slo)
            if isinstance(policy, LiveHeadsPolicy) and spec.progress:  # heads that keep learning: what they did
                changed = sorted(policy.table().heads)
                log(f"  {name}: {policy.swaps} new heads went live (now changed at sites {changed}; "
                    f"inputs learned per site {({s: h.seen for s, h in policy.learners.items() if h.seen})})")
        runs.append(run)
        metrics.append(summarize(run))
        if spec.progress:
            m = metrics[-1]
            log(f"  {name:15s} p50 {m.p50_ms:8.2f} ms  acc {m.accuracy:.2%}  drops {m.dropped}")
    return ExperimentResult(spec, metrics, runs, info, None if phases is None else phases[:n], settings)


class _ServedCosts:
    """`ramp_costs='served'`: per hook a policy runs (plain, learned), the profile with the ramp
    costs a server calibrates here, measured once per experiment; None with 'prepared', and for
    policies that pay no ramps (vanilla, the cost-free oracle)."""

    def __init__(self, spec: ExperimentSpec, bundle: Any, settings: Settings, log: Log):
        if spec.ramp_costs not in ("prepared", "served"):
            raise ValueError(f"ramp_costs must be 'prepared' or 'served', got {spec.ramp_costs!r}")
        self.spec, self.bundle, self.settings, self.log = spec, bundle, settings, log
        self._by_hook: dict[str, Any] = {}

    def profile(self, policy: str) -> Any:
        from .served_costs import hook_of, served_ramp_costs

        if self.spec.ramp_costs == "prepared" or policy in ("vanilla", "optimal"):
            return None
        hook = hook_of(policy)
        if hook not in self._by_hook:
            prof = served_ramp_costs(self.bundle, hook, self.spec.max_batch, self.settings, self.spec.threads)
            self._by_hook[hook] = prof
            self.log(f"ramp costs as served here, {hook} hook: {prof.at(1)[1].mean():.3f} ms a ramp at batch 1 "
                     f"(the bundle's {self.bundle.profile.at(1)[1].mean():.3f})")
        return self._by_hook[hook]


def serving_point(run: RunResult, lengths: np.ndarray | None) -> BudgetPoint:
    """Where a trace makes the model serve: the median batch size over served inputs and, for
    text, the mean of each input's batch length (the longest input of its batch)."""
    served = run.batch >= 0
    if not served.any():
        return 1.0, None
    bs = float(np.median(run.batch_size[run.batch[served]]))
    if lengths is None:
        return max(bs, 1.0), None
    longest = np.zeros(run.batch_size.size)
    np.maximum.at(longest, run.batch[served], lengths[: run.batch.size][served])
    return max(bs, 1.0), float(longest[run.batch[served]].mean())


def with_settings(spec: ExperimentSpec, **changes: Any) -> ExperimentSpec:
    s = spec.settings
    return replace(spec, settings=s.replace(**changes) if isinstance(s, Settings) else {**s, **changes})


def by_policy(result: ExperimentResult) -> dict[str, Metrics]:
    return {m.policy: m for m in result.metrics}
