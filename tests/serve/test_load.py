"""Triton's load verb: a re-prepared bundle of the served model swapped in without a restart,
under traffic, with no request failed; a bundle for another model refused; over HTTP
(tritonclient.http) and gRPC (tritonclient.grpc)."""

from __future__ import annotations

import copy
import json
import threading

import httpx
import numpy as np
import pytest

from .conftest import _opts, encode_images, image_request, served_cnn, serving, wait_for

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is a test dependency")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is a test dependency")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def reprepared(tiny_cnn, tmp_path_factory):
    """The tiny CNN's bundle prepared again (other seed, other ramp heads): what a user would load."""
    from dataclasses import replace

    from apparate.model.bundle import load_bundle
    from apparate.model.prepare import prepare_model
    from apparate.zoo.workload import Stream

    rng = np.random.default_rng(7)
    imgs = rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
    out = tmp_path_factory.mktemp("bundles") / "tiny-cnn-v2"
    prepare_model(tiny_cnn.model, encode_images, Stream("rand", imgs, np.full(64, -1), np.ones(64)), out,
                  num_classes=3, site_names=["b1", "b2"], options=replace(_opts(), seed=7), log=lambda s: None)
    load_bundle(out, model=tiny_cnn.model)  # it loads for this model
    return out


def loader(tiny_cnn):
    """bundle path -> ServedModel on a fresh copy of the model, as `apparate serve` builds one."""
    from apparate.model.bundle import load_bundle
    from apparate.serve.model_io import ImageCodec, ServedModel

    def build(path: str):
        model = copy.deepcopy(tiny_cnn.model)
        b = load_bundle(path, model=model)
        return ServedModel("tiny", b.early_exit_model(model=model), ImageCodec(encode_images, (8, 8, 3)), b.profile,
                           num_classes=3, class_names=("red", "green", "blue"), recording=b.recording,
                           fingerprint=b.manifest["model"]["fingerprint"])
    return build


def test_load_under_traffic_drops_nothing(tiny_cnn, reprepared):
    served = served_cnn(tiny_cnn)
    with serving(served, load=loader(tiny_cnn)) as live:
        statuses: list[int] = []
        versions: list[object] = []
        stop = threading.Event()

        def traffic(seed: int) -> None:
            with httpx.Client(base_url=live.url, timeout=60) as c:
                k = 0
                while not stop.is_set():
                    r = c.post("/v2/models/tiny/infer", json=image_request(2, seed=seed * 1000 + k))
                    statuses.append(r.status_code)
                    versions.append(live.engine.served)
                    k += 1

        clients = [threading.Thread(target=traffic, args=(i,)) for i in range(3)]
        for t in clients:
            t.start()
        assert wait_for(lambda: len(statuses) >= 20, timeout=60)
        before = live.engine.served
        triton = httpclient.InferenceServerClient(live.url.removeprefix("http://"))
        try:
            triton.load_model("tiny", config=json.dumps({"bundle": str(reprepared)}))
            after = live.engine.served
            n_at_load = len(statuses)
            assert wait_for(lambda: len(statuses) >= n_at_load + 20, timeout=60)  # served on after the swap
        finally:
            stop.set()
            for t in clients:
                t.join(60)
            triton.close()
        assert after is not before and after.fingerprint == before.fingerprint
        assert statuses and set(statuses) == {200}, f"{statuses.count(200)} of {len(statuses)} answered 200"
        assert versions[0] is before and versions[-1] is after  # traffic on both sides of the swap
        st = httpx.get(live.model_url("/earlyexit"), timeout=30).json()
        assert st["model"] == "tiny"
        # the swapped-in ramps are the new bundle's: the control loop serves its recording
        assert live.engine.control.served is after and live.engine.executor.served is after


def test_load_refuses_another_models_bundle_and_bad_requests(tiny_cnn, tiny_text, reprepared):
    served = served_cnn(tiny_cnn)
    with serving(served, load=loader(tiny_cnn)) as live:
        with httpx.Client(base_url=live.url, timeout=60) as c:
            other = str(tiny_text.bundle.path)
            r = c.post("/v2/repository/models/tiny/load", json={"parameters": {"bundle": other}})
            assert r.status_code == 400 and "was prepared for" in r.json()["error"]
            r = c.post("/v2/repository/models/nope/load", json={"parameters": {"bundle": str(reprepared)}})
            assert r.status_code == 404
            r = c.post("/v2/repository/models/tiny/load", json={"parameters": {}})
            assert r.status_code == 400 and "say which bundle" in r.json()["error"]
            r = c.post("/v2/repository/models/tiny/load", json={"parameters": {"bundle": "/no/such/bundle"}})
            assert r.status_code == 400 and "no bundle at /no/such/bundle" in r.json()["error"]
            assert live.engine.served is served  # nothing was swapped
            ok = c.post("/v2/models/tiny/infer", json=image_request(1))
            assert ok.status_code == 200
            index = c.post("/v2/repository/index", json={"ready": True}).json()
            assert index == [{"name": "tiny", "version": "1", "state": "READY", "reason": ""}]
            assert c.post("/v2/repository/index", content=b"[1]").status_code == 400


def test_load_is_off_unless_allowed_and_works_over_grpc(tiny_cnn, reprepared):
    from apparate.serve.grpc_server import GrpcThread
    from apparate.serve.repository import Repository

    served = served_cnn(tiny_cnn)
    with serving(served) as live:
        r = httpx.post(f"{live.url}/v2/repository/models/tiny/load", json={"parameters": {"bundle": str(reprepared)}})
        assert r.status_code == 403 and "--allow-load" in r.json()["error"]
        with GrpcThread(live.engine, repository=Repository(live.engine, loader(tiny_cnn))) as g:
            client = grpcclient.InferenceServerClient(g.url)
            try:
                with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT.*no bundle at"):
                    client.load_model("tiny", config=json.dumps({"bundle": str(tiny_cnn.bundle.path) + "-none"}))
                client.load_model("tiny", config=json.dumps({"bundle": str(reprepared)}))
                assert live.engine.served is not served
                x = grpcclient.InferInput("input", [1, 8, 8, 3], "UINT8")
                x.set_data_from_numpy(np.zeros((1, 8, 8, 3), dtype=np.uint8))
                assert client.infer("tiny", [x]).as_numpy("label").shape == (1,)
                assert client.get_model_repository_index(as_json=True)["models"][0]["state"] == "READY"
            finally:
                client.close()
