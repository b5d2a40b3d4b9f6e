"""The serving side of the GPU path on the CPU: the executor's event-based release path driven by
stand-in events (every input released exactly once, at the same ramps as the direct path; a
failing release does not hang the batch), a bundle loaded onto a named device serving, a profile
from another device re-measured at start-up, `apparate bench gpu`'s tables, `--device cuda`
refused clearly where there is no CUDA."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from apparate.core.controller import Config
from apparate.model.host_copy import HostRelease
from apparate.serve.executor import Executor
from apparate.serve.requests import Answer, Request

from .conftest import served_cnn, serving
from ..model.test_host_copy import Gates


def _requests(n: int, seed: int = 0) -> list[Request]:
    imgs = np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return [Request(img, 1, 0.0, 0.0) for img in imgs]


class Collect:
    """The release callback: every (request, result) handed over, and optionally a failure."""

    def __init__(self, fail_early: bool = False) -> None:
        self.pairs: list = []
        self.fail_early = fail_early

    def __call__(self, pairs) -> None:
        if self.fail_early and any(isinstance(res, Answer) and res.early for _, res in pairs):
            raise RuntimeError("release failed on purpose")
        self.pairs.extend(pairs)


def _run(served, release, cfg, reqs, host=None):
    ex = Executor(served, release)
    if host is not None:
        ex._host = host  # the waiter path, as a CUDA model gets it, with stand-in events
    try:
        with torch.inference_mode():
            return ex, ex.run(reqs, cfg, 0.0)
    finally:
        ex.close()


@pytest.mark.parametrize("threshold", [0.0, 0.4, 1.0])
def test_event_path_releases_each_input_once_at_the_direct_paths_ramps(tiny_cnn, threshold):
    cfg = Config((0, 1), (threshold, threshold))
    reqs_a, reqs_b = _requests(8), _requests(8)
    direct = Collect()
    _, rep_a = _run(served_cnn(tiny_cnn), direct, cfg, reqs_a)
    deferred = Collect()
    gates = Gates(passing=True)
    _, rep_b = _run(served_cnn(tiny_cnn), deferred, cfg, reqs_b, HostRelease(torch.device("cpu"), event=gates))
    assert len(gates.made) == 3  # two ramps' copies and the batch's end
    for reqs, got in ((reqs_a, direct), (reqs_b, deferred)):
        ids = [id(r) for r, _ in got.pairs]
        assert sorted(ids) == sorted(id(r) for r in reqs)  # each input exactly once
    a = {i: (res.label, res.exit_site) for i, (r, res) in enumerate(sorted(direct.pairs, key=lambda p: reqs_a.index(p[0])))}
    b = {i: (res.label, res.exit_site) for i, (r, res) in enumerate(sorted(deferred.pairs, key=lambda p: reqs_b.index(p[0])))}
    assert a == b  # same answers, released at the same ramps
    assert np.array_equal(rep_a.exit_pos, rep_b.exit_pos) and np.allclose(rep_a.conf, rep_b.conf)
    assert rep_b.feedback and rep_b.ramp_ms == {}  # host stamps do not time device stages: none reported
    if threshold == 1.0:
        assert (rep_b.exit_pos == 0).all()


class FailingEvent:
    """A stand-in event whose wait raises, as an asynchronous device error surfaces at the next
    synchronisation on CUDA."""

    def record(self) -> None:
        return None

    def synchronize(self) -> None:
        raise RuntimeError("device error on purpose")


def test_event_path_failing_wait_falls_back_without_hanging(tiny_cnn):
    served = served_cnn(tiny_cnn)
    reqs = _requests(4)
    got = Collect()
    ex, rep = _run(served, got, Config((0, 1), (1.0, 1.0)), reqs, HostRelease(torch.device("cpu"), event=FailingEvent))
    assert rep is not None and not rep.feedback and ex.ramp_failures == 1
    assert sorted(id(r) for r, _ in got.pairs) == sorted(id(r) for r in reqs)  # each once, from the final output
    assert all(isinstance(res, Answer) and not res.early for _, res in got.pairs)


def test_event_path_failing_release_does_not_hang(tiny_cnn):
    """A release callback that raises on the waiter: the batch ends (the executor serves it
    without ramps, as when a release raises in the hook on the CPU) and the next one runs."""
    served = served_cnn(tiny_cnn)
    got = Collect(fail_early=True)
    ex = Executor(served, got)
    ex._host = HostRelease(torch.device("cpu"), event=Gates(True))
    try:
        with torch.inference_mode():
            rep = ex.run(_requests(4), Config((0, 1), (1.0, 1.0)), 0.0)
            assert rep is not None and not rep.feedback and ex.ramp_failures == 1
            reqs = _requests(4, seed=1)
            rep = ex.run(reqs, Config((), ()), 0.0)  # the waiter carries on with the next batch
        assert rep.feedback and {id(r) for r in reqs} <= {id(r) for r, _ in got.pairs}
    finally:
        ex.close()


def test_bundle_loaded_with_device_cpu_serves(tiny_cnn):
    import httpx

    from apparate.model.bundle import load_bundle

    from .conftest import encode_images, image_request
    from apparate.serve.model_io import ImageCodec, ServedModel
    import copy

    b = load_bundle(tiny_cnn.bundle.path, model=copy.deepcopy(tiny_cnn.model), device="cpu")
    served = ServedModel("tiny", b.early_exit_model(), ImageCodec(encode_images, (8, 8, 3)), b.profile, num_classes=3,
                         recording=b.recording)
    assert served.device == torch.device("cpu") and served.codec.device is None
    with serving(served) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        assert live.engine.executor._host is None  # the CPU: the direct path
        r = c.post("/v2/models/tiny/infer", json=image_request(3))
        assert r.status_code == 200, r.text


def test_profile_from_another_device_is_remeasured_here(tiny_cnn, caplog):
    from apparate.core.profile import LatencyProfile
    from apparate.serve.device_profile import on_serving_device

    served = served_cnn(tiny_cnn)
    p = served.profile
    assert on_serving_device(served, p) is p  # profiled on this device: kept
    gpu = LatencyProfile(p.batch_sizes, p.site_ms, p.ramp_ms, p.vanilla_ms, p.lengths, p.site_names, device="cuda:0")
    with caplog.at_level(logging.WARNING, logger="apparate.serve"):
        new = on_serving_device(served, gpu)
    assert new.device == "cpu" and np.array_equal(new.batch_sizes, p.batch_sizes)
    assert any("measured on cuda:0" in m and "served on cpu" in m for m in caplog.messages)
    served.ee.remove_hooks()


def test_bench_gpu_tables_on_the_cpu(tiny_cnn):
    from apparate.bench.gpu import format_report, measure

    served = served_cnn(tiny_cnn)
    items = list(np.random.default_rng(1).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8))
    rep = measure(served, items, ramps=2, sizes=(1, 4), repeats=3, live_s=0.5, load=0.2)
    assert rep.device == "cpu" and rep.sites == (0, 1)
    assert [p[0] for p in rep.passes] == [1, 4] and all(v > 0 for p in rep.passes for v in p[1:])
    assert [r[0] for r in rep.ramp_costs] == [0, 1]
    assert {(b, s) for b, s, *_ in rep.delays} == {(1, 0), (1, 1), (4, 0), (4, 1)}
    assert [r[0] for r in rep.live] == ["vanilla", "apparate"] and rep.live[0][-2] == 1.0  # vanilla agrees with itself
    text = format_report(rep)
    for title in ("Bare model vs the served path", "Ramp cost per site", "release delay", "Live: vanilla vs apparate"):
        assert title in text
    served.ee.remove_hooks()


def test_device_cuda_without_cuda_is_a_clear_error(tiny_cnn, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    from apparate.cli import main

    for argv in (["serve", str(tiny_cnn.bundle.path), "--device", "cuda"],
                 ["prepare", "cifar10-resnet20", "--out", "unused", "--device", "cuda:0"],
                 ["bench", "gpu", str(tiny_cnn.bundle.path), "--device", "cuda"]):
        assert main(argv) == 2
        assert "CUDA is not available" in capsys.readouterr().err


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_cuda_executor_serves_through_the_waiter(tiny_cnn):
    served = served_cnn(tiny_cnn)
    served.ee.to("cuda")
    served.codec.device = torch.device("cuda")
    reqs = _requests(8)
    got = Collect()
    ex, rep = _run(served, got, Config((0, 1), (0.4, 0.4)), reqs)
    assert sorted(id(r) for r, _ in got.pairs) == sorted(id(r) for r in reqs) and rep.feedback
    served.ee.remove_hooks()


def test_a_release_that_raises_still_answers_every_input_on_the_cpu(tiny_cnn):
    """The direct path: an early release that raises in the hook fails the ramps, the batch is
    re-run without them, and the inputs of that release are answered from the final output
    (they used to be marked released before the hand-over, and got nothing)."""
    served = served_cnn(tiny_cnn)
    got = Collect(fail_early=True)
    reqs = _requests(4)
    ex, rep = _run(served, got, Config((0, 1), (1.0, 1.0)), reqs)
    assert rep is not None and not rep.feedback and ex.ramp_failures == 1
    assert sorted(id(r) for r, _ in got.pairs) == sorted(id(r) for r in reqs)  # each answered once
    assert all(isinstance(res, Answer) and not res.early for _, res in got.pairs)
