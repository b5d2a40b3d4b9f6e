"""One constructor of settings per kind of workload (`Settings.for_kind`): the server and every
replay entry point build the same settings for the same workload and flags."""

from __future__ import annotations

from dataclasses import replace

import pytest

FLAGS = ["--accuracy-constraint", "0.02", "--ramp-budget", "0.05", "--set", "stop_min_rest=0.1", "--set", "margin_z=2"]
CHANGES = {"accuracy_constraint": 0.02, "ramp_budget": 0.05, "stop_min_rest": 0.1, "margin_z": 2}


@pytest.mark.parametrize("kind", ["image", "text"])
def test_server_and_replay_build_the_same_settings(kind, tiny_cnn, tiny_text, monkeypatch):
    import apparate.bench.experiment as experiment
    from apparate import api
    from apparate.bench.experiment_args import spec_from_args as bench_spec
    from apparate.cli import build_parser
    from apparate.cli.replay import spec_from_args as replay_spec
    from apparate.cli.serve import options_from_args
    from apparate.core.settings import Settings
    from apparate.policies.catalog import RampFamily
    from apparate.serve.control import ControlOptions
    from apparate.serve.engine import Engine, EngineOptions

    from .conftest import served_cnn, served_text

    prep, served = (tiny_cnn, served_cnn(tiny_cnn)) if kind == "image" else (tiny_text, served_text(tiny_text))
    bundle = prep.bundle
    assert bundle.kind == served.kind == kind
    want = Settings.for_kind(kind, **CHANGES)
    assert (want == Settings(**CHANGES)) == (kind == "image")  # text differs: one way for both matters
    parser = build_parser()

    # live: `apparate serve` flags -> ServeOptions -> ControlOptions -> the control loop's controller
    opts = options_from_args(parser.parse_args(["serve", str(bundle.path), *FLAGS]))
    live = {}
    for name, settings in (("flags", opts.settings(served.kind)), ("default", None)):
        engine = Engine(served, EngineOptions(slo_ms=2000, threads=1),
                        ControlOptions(policy="apparate", settings=settings))
        try:
            live[name] = engine.control.controller.settings
        finally:
            engine.executor.close()
    served.ee.remove_hooks()
    assert live["flags"] == want
    assert live["default"] == Settings.for_kind(kind)

    # replay: `apparate replay`, `apparate bench compare`, `apparate.compare`
    fam = {"light": RampFamily(bundle.recording, bundle.recording, bundle.profile)}
    quiet = dict(log=lambda _s: None, families=fam)
    spec = replay_spec(parser.parse_args(["replay", str(bundle.path), "--recording", "r.npz", *FLAGS]), bundle)
    assert experiment.run_experiment(spec, **quiet).settings == want
    spec = bench_spec(parser.parse_args(["bench", "compare", "w", "--no-progress", *FLAGS]), ("vanilla", "apparate"))
    assert spec.settings_for(bundle.kind) == want  # what run_experiment builds once it has loaded the bundle
    with pytest.raises(ValueError, match="kind"):
        experiment.run_experiment(spec, **quiet)  # given recordings alone, the kind is not guessed
    assert experiment.run_experiment(replace(spec, kind=bundle.kind), **quiet).settings == want

    seen = []
    monkeypatch.setattr(experiment, "run_experiment",
                        lambda spec, log=None: seen.append(spec) or experiment.ExperimentResult(spec, [], [], {}))
    api.compare(bundle.path, settings=CHANGES, policies=["apparate"])
    assert seen[0].settings_for(bundle.kind) == want
