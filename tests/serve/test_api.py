"""Every endpoint of a real server on a free loopback port, with real requests."""

from __future__ import annotations

import httpx
import pytest

from .conftest import image_request, served_cnn, served_text, serving, text_request, wait_for


@pytest.fixture(scope="module")
def cnn_server(tiny_cnn):
    from apparate.core.controller import Config
    from apparate.serve.control import ControlOptions

    # Site 0 releases everything it sees (threshold 1), site 1 nothing: both paths are exercised.
    with serving(served_cnn(tiny_cnn), control_opts=ControlOptions(policy="static", initial=Config((0, 1), (1.0, 0.0)))) as live:
        yield live


def test_health_and_server_metadata(cnn_server):
    with httpx.Client(base_url=cnn_server.url) as c:
        assert c.get("/v2/health/live").json() == {"live": True}
        r = c.get("/v2/health/ready")
        assert r.status_code == 200 and r.json() == {"ready": True}
        meta = c.get("/v2").json()
        assert meta["name"] == "apparate" and "earlyexit" in meta["extensions"]


def test_model_metadata_and_readiness(cnn_server):
    with httpx.Client(base_url=cnn_server.url) as c:
        for path in ("/v2/models/tiny", "/v2/models/tiny/versions/1"):
            m = c.get(path).json()
            assert m["name"] == "tiny" and m["versions"] == ["1"]
            assert m["inputs"][0] == {"name": "input", "datatype": "UINT8", "shape": [-1, 8, 8, 3],
                                      "parameters": {"also_accepts": "FP32", "layout": "NHWC", "range": "0..255"}}
            assert [o["name"] for o in m["outputs"]] == ["label", "class_name", "confidence", "exit_site", "early_exit"]
            assert m["parameters"]["num_sites"] == 2
        assert c.get("/v2/models/tiny/ready").json() == {"name": "tiny", "ready": True}
        assert c.get("/v2/models/tiny/versions/1/ready").status_code == 200


def test_infer_single_image_reports_early_exit(cnn_server):
    with httpx.Client(base_url=cnn_server.url) as c:
        r = c.post("/v2/models/tiny/infer", json={"id": "req-1", **image_request(1)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "req-1" and body["model_name"] == "tiny" and body["model_version"] == "1"
    p = body["parameters"]
    assert p["early_exit"] is True and p["exit_site"] == 0
    assert 0 <= p["confidence"] <= 1 and p["queue_ms"] >= 0 and p["compute_ms"] >= 0
    assert p["latency_ms"] == pytest.approx(p["queue_ms"] + p["compute_ms"], abs=0.01)
    out = {o["name"]: o for o in body["outputs"]}
    assert out["label"]["datatype"] == "INT64" and out["label"]["shape"] == [1]
    assert out["class_name"]["data"] == [("red", "green", "blue")[out["label"]["data"][0]]]
    assert out["exit_site"]["data"] == [0] and out["early_exit"]["data"] == [True]


def test_infer_many_inputs_fp32_and_output_selection(cnn_server):
    req = image_request(5, seed=3, dtype="FP32")
    req["outputs"] = [{"name": "label"}, {"name": "exit_site"}]
    with httpx.Client(base_url=cnn_server.url) as c:
        r = c.post("/v2/models/tiny/versions/1/infer", json=req)
        same = c.post("/v2/models/tiny/infer", json=image_request(5, seed=3))
    assert r.status_code == 200, r.text
    body = r.json()
    assert [o["name"] for o in body["outputs"]] == ["label", "exit_site"]
    assert body["outputs"][0]["shape"] == [5]
    assert body["parameters"]["inputs"] == 5 and body["parameters"]["exit_sites"] == "0,0,0,0,0"
    # FP32 pixels 0..255 mean the same as UINT8.
    assert body["outputs"][0]["data"] == same.json()["outputs"][0]["data"]


def test_earlyexit_state_and_metrics(cnn_server):
    with httpx.Client(base_url=cnn_server.url) as c:
        for s in range(3):
            assert c.post("/v2/models/tiny/infer", json=image_request(2, seed=s)).status_code == 200
        assert wait_for(lambda: c.get("/v2/models/tiny/earlyexit").json()["total"]["inputs"] >= 6)
        st = c.get("/v2/models/tiny/earlyexit").json()
        metrics = c.get("/metrics")
    assert st["policy"] == "static"
    assert st["config"] == {"version": 0, "sites": [0, 1], "site_names": ["b1", "b2"], "thresholds": [1.0, 0.0]}
    assert st["window"]["exit_rates"] == {"0": 1.0}
    assert 0.0 <= st["window"]["accuracy"] <= 1.0 and st["total"]["agree"] <= st["total"]["inputs"]
    assert st["errors"] == {} and st["slo_ms"] == 2000
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    for name in ("apparate_request_latency_seconds_bucket", 'apparate_exits_total{site="0"}', "apparate_window_accuracy",
                 "apparate_active_ramps 2.0", "apparate_batch_size_bucket", "apparate_queue_depth",
                 "apparate_dropped_total", "apparate_errors_total", 'apparate_http_requests_total{code="200",route="infer"}',
                 'apparate_ramp_threshold{site="0"} 1.0'):
        assert name in text, name


def test_unknown_model_and_path(cnn_server):
    with httpx.Client(base_url=cnn_server.url) as c:
        for method, path in (("GET", "/v2/models/other"), ("GET", "/v2/models/other/ready"),
                             ("POST", "/v2/models/other/infer"), ("GET", "/v2/models/other/earlyexit"),
                             ("GET", "/v2/models/tiny/versions/2"), ("POST", "/v2/models/tiny/versions/7/infer")):
            r = c.request(method, path, json=image_request(1))
            assert r.status_code == 404, (method, path)
            assert "unknown model" in r.json()["error"]
        r = c.get("/v3/whatever")
        assert r.status_code == 404 and "error" in r.json()
        r = c.get("/v2/models/tiny/infer")
        assert r.status_code == 405 and "error" in r.json()


def test_text_model_bytes_inputs(tiny_text):
    from apparate.serve.control import ControlOptions

    with serving(served_text(tiny_text), control_opts=ControlOptions(policy="vanilla")) as live:
        with httpx.Client(base_url=live.url) as c:
            meta = c.get("/v2/models/words").json()
            assert meta["inputs"][0]["datatype"] == "BYTES" and meta["inputs"][0]["name"] == "text"
            r = c.post("/v2/models/words/infer", json=text_request(["great fun", "dull and flat and long"]))
            assert r.status_code == 200, r.text
            out = {o["name"]: o["data"] for o in r.json()["outputs"]}
            assert set(out["class_name"]) <= {"negative", "positive"} and out["exit_site"] == [-1, -1]
            st = c.get("/v2/models/words/earlyexit").json()
            assert st["policy"] == "vanilla" and st["config"]["sites"] == []


def _binary(tensors: list[tuple[dict, bytes]]) -> tuple[bytes, dict[str, str]]:
    import json

    head = json.dumps({"inputs": [{**t, "parameters": {"binary_data_size": len(raw)}} for t, raw in tensors]}).encode()
    return head + b"".join(raw for _, raw in tensors), {"inference-header-content-length": str(len(head)),
                                                         "content-type": "application/octet-stream"}


def test_binary_tensor_extension(cnn_server, tiny_text):
    import numpy as np

    from apparate.serve.control import ControlOptions

    img = np.random.default_rng(5).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    with httpx.Client(base_url=cnn_server.url) as c:
        as_json = c.post("/v2/models/tiny/infer", json={"inputs": [{"name": "input", "shape": [2, 8, 8, 3],
                                                                     "datatype": "UINT8", "data": img.reshape(-1).tolist()}]})
        body, headers = _binary([({"name": "input", "shape": [2, 8, 8, 3], "datatype": "UINT8"}, img.tobytes())])
        as_u8 = c.post("/v2/models/tiny/infer", content=body, headers=headers)
        body, headers = _binary([({"name": "input", "shape": [2, 8, 8, 3], "datatype": "FP32"},
                                  img.astype("<f4").tobytes())])
        as_f32 = c.post("/v2/models/tiny/infer", content=body, headers=headers)
        assert as_json.status_code == as_u8.status_code == as_f32.status_code == 200, (as_u8.text, as_f32.text)
        labels = [r.json()["outputs"][0]["data"] for r in (as_json, as_u8, as_f32)]
        assert labels[0] == labels[1] == labels[2]
        # wrong sizes and headers are 400s
        body, headers = _binary([({"name": "input", "shape": [2, 8, 8, 3], "datatype": "UINT8"}, img.tobytes()[:-1])])
        r = c.post("/v2/models/tiny/infer", content=body, headers=headers)
        assert r.status_code == 400 and "bytes of binary data" in r.json()["error"]
        r = c.post("/v2/models/tiny/infer", content=body + b"xx", headers=headers)
        assert r.status_code == 400 and "not claimed" in r.json()["error"]
        r = c.post("/v2/models/tiny/infer", content=body, headers={"inference-header-content-length": "9999999"})
        assert r.status_code == 400 and "does not fit" in r.json()["error"]
    texts = ["great fun", "dull"]
    raw = b"".join(len(t.encode()).to_bytes(4, "little") + t.encode() for t in texts)
    with serving(served_text(tiny_text), control_opts=ControlOptions(policy="vanilla")) as live:
        with httpx.Client(base_url=live.url) as c:
            body, headers = _binary([({"name": "text", "shape": [2], "datatype": "BYTES"}, raw)])
            r = c.post("/v2/models/words/infer", content=body, headers=headers)
            ref = c.post("/v2/models/words/infer", json=text_request(texts))
            assert r.status_code == 200, r.text
            assert r.json()["outputs"][0]["data"] == ref.json()["outputs"][0]["data"]
            body, headers = _binary([({"name": "text", "shape": [2], "datatype": "BYTES"}, raw[:-2])])
            r = c.post("/v2/models/words/infer", content=body, headers=headers)
            assert r.status_code == 400 and "cut short" in r.json()["error"]
