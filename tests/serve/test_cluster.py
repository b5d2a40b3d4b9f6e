"""The cluster on a real local Ray (`ray.init(num_cpus=2)`, one per test session): two replicas of
the tiny CNN behind Serve's HTTP proxy, one tuner actor. Feedback from both replicas reaches the
tuner, its Configs are applied by both; a replica killed under load is replaced and starts from
the tuner's Config; a killed tuner is restored from its checkpoint and replicas re-register; a
tuner gone for good leaves replicas serving their last Config and saying so.

Skipped where Ray is not installed (`pip install 'apparate[cluster]'`; the test extra has it).
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from .conftest import REPO, Prepared, image_request, served_cnn, wait_for
from .test_control import small_settings

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

# The tiny CNN starts the wrong way round (site 0's ramp, which agrees with the model, never
# releases; site 1's, which does not, releases everything): the tuner's first tune changes it.
WRONG = ((0, 1), (0.0, 1.0))


def tiny_parts(model: Any, bundle_dir: str) -> tuple[Any, Any, Any]:
    """A replica's engine parts (runs in the replica's process: module-level, so Ray can ship it)."""
    from apparate.model.bundle import load_bundle
    from apparate.serve.control import ControlOptions
    from apparate.serve.engine import EngineOptions

    served = served_cnn(Prepared(model, load_bundle(bundle_dir, model=model)))
    return served, EngineOptions(slo_ms=2000, threads=1), ControlOptions(settings=small_settings(),
                                                                         feedback_min_inputs=8)


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    """One local Ray for the session's Ray tests, which all live in this module: shut down after
    them, so that its daemons do not take CPU from the timing-sensitive tests that follow. Its
    workers import this worktree's code and these tests."""
    src = str(REPO / "src")
    path = os.pathsep.join([src, str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="apparate",
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})
    yield
    serve.shutdown()
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def cluster(ray_session: None, tiny_cnn: Prepared, tmp_path: Path) -> Iterator[Any]:
    from functools import partial

    from apparate.cluster.launch import ClusterOptions, deploy
    from apparate.cluster.replica import ReplicaSpec
    from apparate.cluster.tuner_core import TunerSpec
    from apparate.core.controller import Config
    from apparate.serve.control import ControlOptions

    control = ControlOptions(settings=small_settings(), initial=Config(*WRONG), state_dir=str(tmp_path / "state"),
                             checkpoint_every_s=60.0, feedback_min_inputs=8)
    tuner = partial(TunerSpec.from_bundle, str(tiny_cnn.bundle.path), control, 16, "tiny")
    replica = ReplicaSpec(partial(tiny_parts, tiny_cnn.model, str(tiny_cnn.bundle.path)))
    c = deploy(tuner, replica, ClusterOptions(replicas=2, replica_cpus=0.5, health_check_period_s=0.5,
                                              graceful_shutdown_wait_loop_s=0.1, heartbeat_s=0.2), port=free_port())
    c.state_dir = tmp_path / "state"
    try:
        yield c
    finally:
        serve.shutdown()
        ray.kill(c.tuner, no_restart=True)


def tuner_state(c: Any) -> dict[str, Any]:
    from apparate.cluster.tuner import get_tuner

    return ray.get(get_tuner().state.remote(), timeout=30)


def drive(c: Any, n: int, workers: int = 4, seed: int = 0) -> list[int]:
    """n requests of 4 images from `workers` threads at once; their status codes."""
    def one(i: int) -> int:
        with httpx.Client(timeout=60) as h:
            return h.post(c.model_url("/infer"), json=image_request(4, seed=seed + i)).status_code

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(n)))


def replicas_seen(c: Any, want: int, cond: Any, tries: int = 200) -> dict[str, dict]:
    """/earlyexit asked until `want` distinct replicas have answered with a state meeting `cond`."""
    seen: dict[str, dict] = {}
    with httpx.Client(timeout=30) as h:
        for _ in range(tries):
            st = h.get(c.model_url("/earlyexit")).json()
            if cond(st):
                seen[st["cluster"]["replica"]] = st
            if len(seen) >= want:
                break
    return seen


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    names = [f.name for f in text_string_to_metric_families(text)]
    assert len(names) == len(set(names)), "a metric family appears twice"
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def tuned(c: Any) -> dict[str, Any]:
    """Drive until the tuner has changed its Config and every replica holds the new number."""
    st: dict[str, Any] = {}

    def done() -> bool:
        nonlocal st
        drive(c, 8)
        st = tuner_state(c)
        alive = [r for r in st["replicas"].values() if r["alive"]]
        return st["seq"] > 1 and len(alive) == 2 and all(r["applied"] == st["seq"] for r in alive)

    assert wait_for(done, timeout=60, every=0.05), __import__("json").dumps(st, default=str)[:3000]
    return st


def test_two_replicas_feed_one_tuner_apply_its_configs_and_a_killed_one_restarts_from_them(cluster):
    c = cluster
    with httpx.Client(timeout=30) as h:
        r = h.post(c.model_url("/infer"), json=image_request(3, seed=1))
        assert r.status_code == 200
        body = r.json()
        assert body["model_name"] == "tiny" and body["outputs"][0]["shape"] == [3]
        assert body["parameters"]["exit_sites"] == "1,1,1"  # the start Config: site 1 releases all
        assert h.get(c.url + "/v2/health/ready").status_code == 200
    st = tuned(c)
    # Feedback from both replicas reached the one tuner, which changed the Config once it had it.
    assert len(st["replicas"]) == 2 and all(r["inputs"] > 0 for r in st["replicas"].values()), st
    assert tuple(st["config"]["thresholds"]) != WRONG[1]
    assert st["control"]["controller"]["inputs"] >= sum(r["inputs"] for r in st["replicas"].values()) - 64
    # Both replicas serve it, under the tuner's number, and say so.
    seen = replicas_seen(c, 2, lambda s: s["config"]["version"] >= st["seq"])
    assert set(seen) == set(st["replicas"]), (set(seen), st["replicas"].keys())
    for s in seen.values():
        assert s["cluster"]["tuner"]["reachable"] is True
        assert s["cluster"]["tuner_state"]["incarnation"] == st["incarnation"]
    # The tuner's exposition holds each replica's series as the replica last pushed them (with its
    # feedback): asked until both show the Config they serve, within a generous deadline.
    deadline = time.monotonic() + 60
    with httpx.Client(timeout=30) as h:
        while True:
            samples = metric_samples(h.get(c.url + "/metrics").text)  # one valid exposition each time
            if all(samples.get(("apparate_config_version", (("replica", rid),)), -1) >= st["seq"]
                   for rid in st["replicas"]) or time.monotonic() > deadline:
                break
            h.post(c.model_url("/infer"), json=image_request(1, seed=2))  # traffic: replicas push feedback
    assert samples[("apparate_tuner_config_version", ())] >= st["seq"]
    for rid in st["replicas"]:
        assert samples[("apparate_tuner_feedback_lag_seconds", (("replica", rid),))] >= 0
        assert samples[("apparate_tuner_feedback_inputs_total", (("replica", rid),))] > 0
        assert samples[("apparate_config_version", (("replica", rid),))] >= st["seq"]
        assert sum(v for (name, labels), v in samples.items()
                   if name == "apparate_exits_total" and ("replica", rid) in labels) > 0

    # A replica killed under load: Serve replaces it; the new one starts from the tuner's Config.
    victim = sorted(st["replicas"])[0]
    codes: list[int] = []
    errors: list[tuple[int, str]] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=60) as h:
            i = 0
            while not stop.is_set():
                try:
                    r = h.post(c.model_url("/infer"), json=image_request(2, seed=i))
                    codes.append(r.status_code)
                    if r.status_code != 200:
                        errors.append((r.status_code, r.text[:300]))
                except httpx.HTTPError as e:
                    codes.append(-1)
                    errors.append((-1, repr(e)))
                i += 1

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        assert wait_for(lambda: len(codes) >= 10, timeout=30)
        ray.kill(ray.get_actor(f"SERVE_REPLICA::apparate#Replica#{victim}", namespace="serve"), no_restart=True)
        before = len(codes)

        def replaced() -> bool:
            now = tuner_state(c)
            fresh = [rid for rid in now["replicas"] if rid not in st["replicas"]]
            return bool(fresh) and now["replicas"][fresh[0]]["applied"] == now["seq"]

        assert wait_for(replaced, timeout=60, every=0.1)
        assert wait_for(lambda: len(codes) >= before + 20, timeout=30)
    finally:
        stop.set()
        for t in threads:
            t.join()
    now = tuner_state(c)
    fresh = [rid for rid in now["replicas"] if rid not in st["replicas"]][0]
    # Only requests in flight on the victim may have failed; the rest, and all after, succeeded.
    failed = [x for x in codes if x != 200]
    print(f"replica killed under load: {len(failed)} of {len(codes)} requests failed: {errors}")
    assert len(failed) <= 6, errors
    assert wait_for(lambda: serve.status().applications["apparate"].deployments["Replica"].replica_states
                    == {"RUNNING": 2}, timeout=30)
    assert all(code == 200 for code in drive(c, 8))  # once Serve has replaced it, nothing fails
    # The new replica started from the tuner's Config (its number at registration), not from nothing.
    assert now["replicas"][fresh]["registrations"] == 1
    seen = replicas_seen(c, 1, lambda s: s["cluster"]["replica"] == fresh)
    assert seen[fresh]["config"]["thresholds"] == now["config"]["thresholds"]
    assert now["control"]["controller"]["inputs"] >= st["control"]["controller"]["inputs"]  # nothing lost


def test_a_killed_tuner_is_restored_and_replicas_reregister_or_serve_on(cluster):
    from apparate.cluster.tuner import get_tuner

    c = cluster
    tuned(c)
    saved = ray.get(get_tuner().checkpoint.remote(), timeout=30)  # the state as written
    assert saved["path"] and Path(saved["path"]).parent == c.state_dir
    ray.kill(get_tuner(), no_restart=False)  # Ray restarts it; its __init__ restores the checkpoint

    def back() -> bool:
        try:
            st = tuner_state(c)
        except Exception:  # noqa: BLE001 - restarting
            return False
        return st["incarnation"] != saved["incarnation"] and len(st["replicas"]) == 2

    assert wait_for(back, timeout=60, every=0.1)
    st = tuner_state(c)
    assert st["restored"]["from"] == str(c.state_dir)
    assert st["seq"] >= saved["seq"] and st["config"]["thresholds"] == saved["config"]["thresholds"]
    assert st["control"]["controller"]["inputs"] >= saved["control"]["controller"]["inputs"]
    assert set(st["replicas"]) == set(saved["replicas"])  # both registered again with the new one
    assert all(code == 200 for code in drive(c, 8))

    # Gone for good: the replicas keep serving the last Config and say the tuner is unreachable.
    ray.kill(get_tuner(), no_restart=True)
    last = st["seq"]
    seen = replicas_seen(c, 2, lambda s: s["cluster"]["tuner"]["reachable"] is False)
    assert len(seen) == 2
    for s in seen.values():
        assert s["config"]["version"] >= last and s["cluster"]["tuner_state"] is None
        assert s["cluster"]["tuner"]["error"]
    assert all(code == 200 for code in drive(c, 8))
    with httpx.Client(timeout=30) as h:
        samples = metric_samples(h.get(c.url + "/metrics").text)  # this replica's own series, labelled
    assert [v for (name, _), v in samples.items() if name == "apparate_tuner_reachable"] == [0.0]
