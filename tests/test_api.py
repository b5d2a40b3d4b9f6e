"""The Python API: prepare a real (small) model, compare policies on it, from the package top."""

import numpy as np
import pytest

import apparate


def test_prepare_a_zoo_workload_and_replay_it(data_dir, tmp_path):
    bundle = apparate.prepare("cifar10-resnet20", tmp_path / "b", data_dir=data_dir, bootstrap=300, max_batch=2,
                              warmup=0, repeats=1, holdout=0.25, progress=False)
    assert bundle.num_sites == 9 and (tmp_path / "b" / "manifest.json").exists()
    result = apparate.compare(bundle, "test", policies=["vanilla", "apparate", "optimal"], n=200, rate=50.0,
                             data_dir=data_dir)
    assert list(result.metrics) == ["vanilla", "apparate", "optimal"]
    assert all(m.requests == 200 for m in result.metrics.values())
    assert result.metrics["vanilla"].accuracy == 1.0
    assert result.metrics["optimal"].p50_ms <= result.metrics["vanilla"].p50_ms
    assert "apparate" in result.table() and "p50 vs vanilla" in result.table()


def test_prepare_your_own_model(r20, tmp_path):
    stream = r20.stream("test", n=60)
    bundle = apparate.prepare(r20.model, tmp_path / "own", encode=r20.encode, bootstrap=stream, num_classes=10,
                              max_batch=2, warmup=0, repeats=1, holdout=0.25, epochs=2, progress=False)
    assert bundle.num_sites == 9 and np.all(bundle.profile.ramp_ms > 0)
    with pytest.raises(ValueError, match="encode"):
        apparate.prepare(r20.model, tmp_path / "x")


def test_serving_answers_over_http_and_in_process(r20, r20_bundle, test_images, data_dir):
    import httpx
    import torch

    imgs = np.asarray(test_images.inputs[:2], dtype=np.uint8)  # [2, 32, 32, 3]
    with apparate.serving(r20_bundle, data_dir=data_dir, policy="vanilla", threads=1, max_batch=4) as server:
        assert server.url.startswith("http://127.0.0.1:") and server.port != 0
        body = {"inputs": [{"name": "input", "shape": list(imgs.shape), "datatype": "UINT8",
                            "data": imgs.reshape(-1).tolist()}]}
        r = httpx.post(f"{server.url}/v2/models/{server.engine.served.name}/infer", json=body, timeout=30)
        assert r.status_code == 200, r.text
        labels = [o for o in r.json()["outputs"] if o["name"] == "label"][0]["data"]
        # vanilla serves the original model's answers: the same as a plain forward pass
        direct = [f.result(30).label for f in server.engine.submit(list(imgs))]
        assert labels == direct and len(labels) == 2
        # and the model's own answers are the labels of a plain forward pass
        with torch.no_grad():
            out = r20.model(r20.encode([test_images.item(i).input for i in range(2)]))
        assert labels == out.argmax(1).tolist()
    assert not server.engine.running  # stopped with the block
