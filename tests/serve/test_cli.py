"""`apparate serve` and `apparate loadgen` end to end: a real process, SIGINT, restart."""

from __future__ import annotations

import contextlib
import io
import json
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from .conftest import wait_for


@pytest.fixture(scope="module")
def r20_bundle(tmp_path_factory):
    """CIFAR ResNet-20 (a zoo model: `apparate serve` can rebuild it) prepared on 40 images."""
    from apparate.model.prepare import PrepareOptions, prepare_model
    from apparate.zoo.workloads import get_workload

    from .conftest import find_data_dir

    dd = find_data_dir()
    wl = get_workload("cifar10-resnet20", dd)
    out = tmp_path_factory.mktemp("bundles") / "r20"
    opts = PrepareOptions(holdout=0.5, max_batch=4, warmup=1, repeats=2, progress=False, epochs=3, threads=1)
    prepare_model(wl.model, wl.encode, wl.stream("test", n=40), out, num_classes=10, source=wl.source,
                  class_names=wl.class_names, ramp="pool", options=opts, log=lambda s: None)
    return out, dd


def _start(bundle, dd, tmp, *extra):
    proc, info = _start_info(bundle, dd, tmp, *extra)
    return proc, info["url"]


def _start_info(bundle, dd, tmp, *extra):
    port_file = tmp / f"port-{time.monotonic_ns()}.json"
    cmd = [sys.executable, "-m", "apparate", "serve", str(bundle), "--port", "0", "--port-file", str(port_file),
           "--data-dir", str(dd), "--threads", "1", "--max-batch", "4", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert wait_for(lambda: port_file.exists() or proc.poll() is not None, timeout=120), "server did not start"
    assert proc.poll() is None, proc.stdout.read()
    return proc, json.loads(port_file.read_text())


def _stop(proc, sig=signal.SIGINT) -> str:
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    return out


def test_serve_loadgen_and_restart(r20_bundle, tmp_path):
    from apparate.cli import main
    from apparate.serve.state import load_state

    bundle, dd = r20_bundle
    state = tmp_path / "state"
    proc, url = _start(bundle, dd, tmp_path, "--state-dir", str(state), "--checkpoint-every", "0.5")
    try:
        assert url.startswith("http://127.0.0.1:")
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.get("/v2/health/ready").status_code == 200
            meta = c.get("/v2/models/cifar10-resnet20").json()
            assert meta["inputs"][0]["shape"] == [-1, 32, 32, 3]
            img = np.zeros((1, 32, 32, 3), dtype=np.uint8).reshape(-1).tolist()
            r = c.post("/v2/models/cifar10-resnet20/infer",
                       json={"inputs": [{"name": "input", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": img}]})
            assert r.status_code == 200, r.text
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = main(["loadgen", url, "--stream", "cifar10-resnet20", "--stream-name", "test", "--rate", "40",
                         "--duration", "1.5", "--warmup", "0", "--trace", "fixed", "--no-progress",
                         "--data-dir", str(dd)])
        report = buf.getvalue()
        assert code == 0, report
        for row in ("throughput (answers/s)", "p50 latency (ms)", "accuracy vs original", "label accuracy",
                    "exits {"):
            assert row in report, report
        assert "60 requests" in report or "requests per run" in report
        # your own inputs and your own arrival log: images from a folder, times from a file
        shots = tmp_path / "shots" / "cat"
        shots.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((20, 24, 3), 40 * i, dtype=np.uint8)).save(shots / f"{i}.png")
        arrivals = tmp_path / "arrivals.csv"
        arrivals.write_text("arrival_s\n0\n0.1\n0.15\n0.4\n")
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = main(["loadgen", url, "--stream", "cifar10-resnet20", "--stream-name", f"images:{shots.parent}",
                         "--trace", f"file:{arrivals}", "--duration", "1", "--warmup", "0", "--no-progress",
                         "--data-dir", str(dd)])
        report = buf.getvalue()
        assert code == 0, report
        # 4 arrivals over 0.4 s, one mean gap (0.133 s) between copies: 2 copies within 1 s, then cut
        assert "its own rate 7.5/s, repeated 2 times (4 arrivals over 0.4 s) to cover 1 s" in report, report
        assert "8 requests over" in report and "8/8 ok" in report, report
    finally:
        out = _stop(proc)
    assert "serving cifar10-resnet20 at http://127.0.0.1:" in out
    saved = load_state(state)
    served = saved["controller"]["window"]["written"] - saved["controller"]["counters"]["seeded"] if saved else 0
    assert saved is not None and served >= 61 + 8
    # Restart on the same state directory: the controller comes back where it was. With gRPC too.
    proc, info = _start_info(bundle, dd, tmp_path, "--state-dir", str(state), "--grpc-port", "0")
    url = info["url"]
    try:
        st = httpx.get(f"{url}/v2/models/cifar10-resnet20/earlyexit", timeout=30).json()
        assert st["restored"]["from"] == str(state)
        assert st["config"] == {**saved["config"], "site_names": st["config"]["site_names"]}
        assert st["control"]["controller"]["inputs"] == served
        _grpc_and_repository_index(info, dd)
    finally:
        out = _stop(proc, signal.SIGTERM)  # SIGTERM shuts down as gracefully as SIGINT
    assert "stopped" in out


def _grpc_and_repository_index(info, dd):
    """NVIDIA's clients against `apparate serve --grpc-port 0`: gRPC infer on real CIFAR images
    (raw contents); the repository index lists the model over HTTP and gRPC."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from apparate.zoo.workloads import get_workload

    assert info["grpc"] == f"127.0.0.1:{info['grpc_port']}"
    wl = get_workload("cifar10-resnet20", dd)
    imgs = np.stack(wl.stream("test", n=4).inputs)
    g = grpcclient.InferenceServerClient(info["grpc"])
    h = httpclient.InferenceServerClient(info["url"].removeprefix("http://"))
    try:
        x = grpcclient.InferInput("input", list(imgs.shape), "UINT8")
        x.set_data_from_numpy(imgs)
        r = g.infer("cifar10-resnet20", [x])
        assert r.as_numpy("label").shape == (4,) and r.get_response().model_name == "cifar10-resnet20"
        assert {"exit_sites", "early_exits", "latency_ms"} <= set(r.get_response().parameters)
        names = [c.decode() for c in r.as_numpy("class_name")]
        assert names == [wl.class_names[i] for i in r.as_numpy("label")]
        want = [{"name": "cifar10-resnet20", "version": "1", "state": "READY", "reason": ""}]
        assert h.get_model_repository_index() == want
        index = g.get_model_repository_index(as_json=True)["models"]
        assert [(m["name"], m["version"], m["state"]) for m in index] == [("cifar10-resnet20", "1", "READY")]
    finally:
        g.close()
        h.close()


def test_serve_apparate_learned(r20_bundle, tmp_path):
    """`apparate serve --policy apparate-learned` on a zoo ResNet-20: it starts, answers, says
    which fit it scores with, checkpoints the fit, and shuts down gracefully."""
    from apparate.serve.state import load_state

    bundle, dd = r20_bundle
    state = tmp_path / "state"
    proc, url = _start(bundle, dd, tmp_path, "--policy", "apparate-learned", "--state-dir", str(state))
    try:
        rng = np.random.default_rng(0)
        with httpx.Client(base_url=url, timeout=30) as c:
            for _ in range(6):
                img = rng.integers(0, 256, (2, 32, 32, 3)).reshape(-1).tolist()
                r = c.post("/v2/models/cifar10-resnet20/infer",
                           json={"inputs": [{"name": "input", "shape": [2, 32, 32, 3], "datatype": "UINT8",
                                             "data": img}]})
                assert r.status_code == 200, r.text
            st = c.get("/v2/models/cifar10-resnet20/earlyexit").json()
            assert st["policy"] == "apparate-learned" and st["scorer_version"] >= 0
    finally:
        out = _stop(proc)
    assert "stopped" in out
    saved = load_state(state)
    assert saved["policy"] == "apparate-learned" and "evidence" in saved and saved["controller"] is not None


@pytest.mark.parametrize("args, msg", [
    (["--early-stop", "--policy", "apparate-learned"], "confidence rule only"),
    (["--early-stop", "--stop-sample", "0"], "--stop-sample: the early-stop sample must be in (0, 1]"),
    (["--set", "stop_min_rest=1.5"], "--set: stop_min_rest must be in [0, 1)"),
    (["--set", "no_such_setting=1"], "--set: "),
])
def test_serve_refuses_early_stop_it_cannot_honour(tmp_path, args, msg):
    r = subprocess.run([sys.executable, "-m", "apparate", "serve", str(tmp_path / "nope"), "--port", "0", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and msg in r.stderr, r.stderr


def test_serve_refuses_a_missing_bundle(tmp_path):
    r = subprocess.run([sys.executable, "-m", "apparate", "serve", str(tmp_path / "nope"), "--port", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no bundle directory" in r.stderr


def test_loadgen_compare_starts_the_servers_and_prints_ratios(r20_bundle, tmp_path):
    from apparate.cli import main

    bundle, dd = r20_bundle
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["loadgen", "--compare", str(bundle), "--stream", "cifar10-resnet20", "--stream-name", "test",
                     "--rate", "30", "--duration", "1", "--warmup", "0.5", "--trace", "poisson", "--no-progress",
                     "--data-dir", str(dd), "--threads", "1", "--max-batch", "4", "--json", str(tmp_path / "s.json"),
                     "--server-log", str(tmp_path / "logs"), "--early-stop", "--serve-arg=--set=stop_pool=16"])
    out = buf.getvalue()
    assert code == 0, out
    assert "servers: vanilla at http://127.0.0.1:" in out and "apparate at http://127.0.0.1:" in out
    assert "apparate-stop at http://127.0.0.1:" in out
    header = next(line for line in out.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "vanilla", "apparate", "apparate-stop", "apparate/vanilla",
                              "apparate-stop/vanilla"]
    assert "same trace and inputs for each server, one after the other" in out
    summaries = json.loads((tmp_path / "s.json").read_text())
    assert set(summaries) == {"vanilla", "apparate", "apparate-stop"}
    assert summaries["vanilla"]["accuracy_vs_original"] == 1.0 and summaries["vanilla"]["early_share"] == 0.0
    assert summaries["vanilla"]["requests"] == summaries["apparate"]["requests"] == summaries["apparate-stop"]["requests"]
    assert summaries["vanilla"]["same_as_reference"] == 1.0  # the client's own check against vanilla's answers
    assert 0.9 <= summaries["apparate-stop"]["same_as_reference"] <= 1.0
    # early stop's rows (those that left, those its pool ran again) from the servers' /earlyexit
    assert summaries["vanilla"]["early_stop"] == {} == summaries["apparate"]["early_stop"]
    stop = summaries["apparate-stop"]["early_stop"]
    assert set(stop) <= {"left", "run again", "of which while work waited"}
    assert stop.get("run again", 0) <= stop.get("left", 0) + 16  # (the pool may hold warm-up's too)
    # every server was shut down gracefully
    for name in ("vanilla", "apparate", "apparate-stop"):
        assert "stopped" in (tmp_path / "logs" / f"{name}.log").read_text()
