"""The cluster's parts that need no Ray: a replica's RemotePolicy (Config ordering), the tuner's
core (pooled feedback from several replicas, Config numbering across restarts, checkpoints in
`--state-dir` format), the merged metrics, and the rule that only `cluster/` imports Ray."""

from __future__ import annotations

import ast
import subprocess
import sys

import numpy as np
from hypothesis import given, settings, strategies as st

from .conftest import REPO
from .test_control import small_settings

SRC = REPO / "src" / "apparate"


def test_only_the_cluster_package_imports_ray():
    bad = []
    for path in SRC.rglob("*.py"):
        if path.relative_to(SRC).parts[0] == "cluster":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            bad += [f"{path.relative_to(SRC)}:{node.lineno} {n}" for n in names if n.split(".")[0] == "ray"]
    assert not bad, bad


def test_serving_without_ray_never_imports_it():
    code = ("import sys, apparate.cli, apparate.cli.serve as s, apparate.serve.server, apparate.cluster.remote, "
            "apparate.cluster.tuner_core; s.options_from_args; print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "False", out.stderr


def test_cluster_flags_need_ray_mode():
    from apparate.cli import main

    assert main(["serve", "nowhere", "--address", "auto"]) != 0
    assert main(["serve", "nowhere", "--ray", "--min-replicas", "2"]) != 0  # autoscaling needs both bounds


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=40))
def test_a_replica_never_goes_back_to_an_older_config(order):
    """Configs delivered in any order (overtaking pushes, replays after a reconnect): the one in
    force is always the newest number seen, with that number's thresholds."""
    from apparate.cluster.remote import RemotePolicy
    from apparate.core.controller import Config

    nudged = []
    pol = RemotePolicy(Config((0,), (0.0,)), 0, lambda fb: None)
    pol.on_change = lambda: nudged.append(pol.seq)
    newest = 0
    for seq in order:
        applied = pol.offer(Config((0,), (seq / 100,)), seq)
        assert applied == (seq > newest)
        newest = max(newest, seq)
        assert pol.seq == newest and pol.config.version == newest and pol.config.thresholds == (newest / 100,)
    assert nudged == sorted(set(nudged))  # every change announced once, in order
    assert pol.stale == sum(1 for i, s in enumerate(order) if s < max([0, *order[:i]]))


def _spec(tiny_cnn, state_dir=None, initial=((0, 1), (0.0, 1.0))):
    from apparate.cluster.tuner_core import TunerSpec
    from apparate.core.controller import Config
    from apparate.serve.control import ControlOptions

    co = ControlOptions(settings=small_settings(), initial=Config(*initial), state_dir=state_dir,
                        checkpoint_every_s=3600.0)
    return TunerSpec.from_bundle(str(tiny_cnn.bundle.path), co, 16, "tiny")


def _feedback(rec, idx, cfg, sent_at=0.0):
    sites = list(cfg["sites"])
    return {"sites": tuple(sites), "thresholds": tuple(cfg["thresholds"]), "conf": rec.conf[idx][:, sites],
            "agree": rec.agree[idx][:, sites], "length": None, "sent_at": sent_at}


def _fed_tuner(tiny_cnn, tmp_path):
    """A tuner with state in tmp_path that one replica, "a", has fed eight batches of 8."""
    from apparate.cluster.tuner_core import TunerCore

    core = TunerCore(_spec(tiny_cnn, str(tmp_path)))
    rec = tiny_cnn.bundle.recording
    core.register("a")
    for k in range(8):
        core.feedback("a", {"applied": core.seq, "feedback": [_feedback(rec, np.arange(8 * k, 8 * k + 8) % len(rec.conf),
                                                                        core.current()["config"])]})
    return core


def test_the_tuner_pools_feedback_from_every_replica_into_one_window(tiny_cnn):
    import time

    from apparate.cluster.tuner_core import TunerCore

    core = TunerCore(_spec(tiny_cnn))
    rec = tiny_cnn.bundle.recording
    a, b = core.register("a"), core.register("b")
    assert a["seq"] == b["seq"] == 1 and a["config"]["thresholds"] == [0.0, 1.0]
    rng = np.random.default_rng(0)
    for k in range(12):  # the two replicas take turns; either alone would see half of this
        for rid in ("a", "b"):
            idx = rng.integers(0, len(rec.conf), 8)
            core.feedback(rid, {"applied": core.seq, "feedback": [_feedback(rec, idx, core.current()["config"],
                                                                            time.time())]})
    st = core.state()
    assert st["replicas"]["a"]["inputs"] == st["replicas"]["b"]["inputs"] == 96
    assert st["control"]["controller"]["inputs"] == 192  # one window over both
    assert st["seq"] > 1 and st["config"]["thresholds"] != [0.0, 1.0]  # tuned on the pooled window
    assert st["config"]["version"] == st["seq"] and all(r["lag_s"] >= 0 for r in st["replicas"].values())
    # Feedback from a replica the tuner does not know (it registered with a lost incarnation)
    # is not used; the reply tells the replica to register.
    assert core.feedback("c", {"applied": 1, "feedback": []})["registered"] is False


def test_a_restored_tuner_numbers_past_what_replicas_hold(tiny_cnn, tmp_path):
    from apparate.cluster.tuner_core import TunerCore
    from apparate.serve.state import read_state

    core = _fed_tuner(tiny_cnn, tmp_path)
    assert core.seq > 1
    core.checkpoint()
    saved = read_state(tmp_path)  # the --state-dir format, plus the Config number
    assert saved.policy == "apparate" and saved.raw["cluster"]["seq"] == core.seq
    held = core.seq + 3  # numbers the lost incarnation issued after its last checkpoint

    again = TunerCore(_spec(tiny_cnn, str(tmp_path)), incarnation="second")
    assert again.loop.restored["from"] == str(tmp_path) and again.seq == core.seq
    assert again.current()["config"]["thresholds"] == core.current()["config"]["thresholds"]
    assert again.state()["control"]["controller"]["inputs"] == core.state()["control"]["controller"]["inputs"]
    cur = again.register("a", held)
    assert cur["seq"] == held + 1 and cur["incarnation"] == "second"  # the replica will take it
    assert again.register("b", 0)["seq"] == held + 1  # a new replica moves nothing


def test_metrics_merge_every_replica_under_its_label(tiny_cnn):
    from prometheus_client.parser import text_string_to_metric_families

    from apparate.cluster.metrics import families
    from apparate.cluster.tuner_core import TunerCore
    from apparate.serve.metrics import ServeMetrics

    core = TunerCore(_spec(tiny_cnn))
    for rid, n in (("a", 3), ("b", 5)):
        m = ServeMetrics(2)
        m.batch_done(np.array([0] * n), np.ones(n, dtype=bool), [0.01] * n, [0.0] * n, 0.02)
        core.register(rid)
        core.feedback(rid, {"applied": 1, "feedback": [], "families": families(m.registry)})
    fams = {f.name: f for f in text_string_to_metric_families(core.metrics.text().decode())}
    exits = {s.labels["replica"]: s.value for s in fams["apparate_exits"].samples if s.name == "apparate_exits_total"}
    assert exits == {"a": 3.0, "b": 5.0}
    assert fams["apparate_tuner_config_version"].samples[0].value == 1.0
    assert fams["apparate_tuner_replicas"].samples[0].value == 2.0


def test_cluster_options_become_serves_deployment_options():
    import pytest

    from apparate.cluster.options import ClusterOptions

    fixed = ClusterOptions(replicas=3, replica_cpus=0.5).deployment_options()
    assert fixed["num_replicas"] == 3 and fixed["ray_actor_options"] == {"num_cpus": 0.5}
    assert "autoscaling_config" not in fixed
    auto = ClusterOptions(replicas=2, min_replicas=3, max_replicas=6).deployment_options()
    assert "num_replicas" not in auto
    assert auto["autoscaling_config"]["initial_replicas"] == 3  # within the bounds
    assert (auto["autoscaling_config"]["min_replicas"], auto["autoscaling_config"]["max_replicas"]) == (3, 6)
    for bad in (dict(replicas=0), dict(replica_cpus=0), dict(min_replicas=2), dict(min_replicas=4, max_replicas=2)):
        with pytest.raises(ValueError):
            ClusterOptions(**bad)


def test_a_tuners_checkpoint_restores_a_single_server_and_back(tiny_cnn, tmp_path):
    """The same --state-dir format both ways: `apparate serve --state-dir` goes on from a cluster
    tuner's checkpoint, and a tuner from a single server's."""
    from apparate.cluster.tuner_core import TunerCore
    from apparate.serve.control import ControlLoop, ControlOptions
    from apparate.serve.metrics import ServeMetrics

    from .conftest import served_cnn

    core = _fed_tuner(tiny_cnn, tmp_path)
    core.checkpoint()
    served = served_cnn(tiny_cnn)
    single = ControlLoop(served, ControlOptions(settings=small_settings(), state_dir=str(tmp_path)),
                         ServeMetrics(served.num_sites))
    assert single.restored["what"] == "profile, config, controller window"
    assert single.config.thresholds == tuple(core.current()["config"]["thresholds"])
    single.checkpoint()  # written by the single server: no `cluster` field
    again = TunerCore(_spec(tiny_cnn, str(tmp_path)))
    assert again.loop.restored["from"] == str(tmp_path) and again.seq >= 1
    assert again.current()["config"]["thresholds"] == core.current()["config"]["thresholds"]
