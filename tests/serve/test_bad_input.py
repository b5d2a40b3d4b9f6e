"""Bad requests get a clear 4xx each, and nothing else is disturbed."""

from __future__ import annotations

import httpx
import pytest

from .conftest import image_request, served_cnn, served_text, serving, text_request


@pytest.fixture(scope="module")
def cnn(tiny_cnn):
    from apparate.serve.control import ControlOptions

    with serving(served_cnn(tiny_cnn, max_inputs=8), control_opts=ControlOptions(policy="vanilla"),
                 max_body_bytes=64 * 1024) as live:
        yield live


def _tensor(**over):
    t = image_request(1)["inputs"][0]
    t.update(over)
    return {"inputs": [t]}


BAD_IMAGE_REQUESTS = [
    ("not json", b"{\"inputs\": [", "malformed JSON"),
    ("not an object", b"[1, 2, 3]", "JSON object"),
    ("no inputs", b"{}", "'inputs'"),
    ("empty inputs", b"{\"inputs\": []}", "'inputs'"),
    ("two tensors", {"inputs": [image_request(1)["inputs"][0]] * 2}, "one input tensor"),
    ("tensor not an object", {"inputs": [3]}, "object"),
    ("wrong input name", _tensor(name="pixels"), "unknown input 'pixels'"),
    ("wrong dtype", _tensor(datatype="INT8"), "UINT8 or FP32"),
    ("wrong shape", _tensor(shape=[1, 8, 9, 3]), "shape [N, 8, 8, 3]"),
    ("shape not a list", _tensor(shape="1x8x8x3"), "list of integers"),
    ("too few values", _tensor(data=[1, 2, 3]), "has 3 values but shape [1, 8, 8, 3] needs 192"),
    ("values out of range", _tensor(data=[300] * 192), "0..255"),
    ("float data as UINT8", _tensor(data=[1.5] * 192), "integers"),
    ("strings as numbers", _tensor(data=["a"] * 192), "integers"),
    ("ragged nested data", _tensor(data=[[1, 2], [3]]), "ragged"),
    ("NaN as FP32", ('{"inputs": [{"name": "input", "shape": [1, 8, 8, 3], "datatype": "FP32", "data": ['
                     + "0.0, " * 191 + "NaN]}]}").encode(), "finite"),
    ("too many inputs", image_request(9), "1 to 8 inputs"),
    ("zero inputs", _tensor(shape=[0, 8, 8, 3], data=[]), "1 to 8 inputs"),
    ("unknown output", {**image_request(1), "outputs": [{"name": "logits"}]}, "unknown outputs"),
    ("id not a string", {**image_request(1), "id": 7}, "'id'"),
]


@pytest.mark.parametrize("name,body,expect", BAD_IMAGE_REQUESTS, ids=[b[0] for b in BAD_IMAGE_REQUESTS])
def test_bad_image_request_is_a_clear_400(cnn, name, body, expect):
    with httpx.Client(base_url=cnn.url) as c:
        if isinstance(body, bytes):
            r = c.post("/v2/models/tiny/infer", content=body, headers={"content-type": "application/json"})
        else:
            r = c.post("/v2/models/tiny/infer", json=body)
    assert r.status_code == 400, r.text
    assert expect in r.json()["error"]


def test_payload_over_the_limit_is_413_with_or_without_length(cnn):
    big = b"{\"inputs\": [" + b" " * (70 * 1024) + b"]}"

    def chunks():
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    with httpx.Client(base_url=cnn.url) as c:
        r = c.post("/v2/models/tiny/infer", content=big)
        assert r.status_code == 413 and "limit" in r.json()["error"]
    with httpx.Client(base_url=cnn.url) as c:  # chunked: no Content-Length to trust
        r = c.post("/v2/models/tiny/infer", content=chunks())
        assert r.status_code == 413


def test_bad_requests_disturb_nothing(cnn):
    """After every kind of bad request above the server answers normally and counts no error."""
    with httpx.Client(base_url=cnn.url) as c:
        for _, body, _ in BAD_IMAGE_REQUESTS[:6]:
            c.post("/v2/models/tiny/infer", content=body if isinstance(body, bytes) else None,
                   json=None if isinstance(body, bytes) else body)
        r = c.post("/v2/models/tiny/infer", json=image_request(3))
        assert r.status_code == 200
        st = c.get("/v2/models/tiny/earlyexit").json()
        assert st["errors"] == {} and st["dropped"] == {}
        assert c.get("/v2/health/ready").status_code == 200


@pytest.fixture(scope="module")
def words(tiny_text):
    from apparate.serve.control import ControlOptions

    with serving(served_text(tiny_text, long_text="reject"), control_opts=ControlOptions(policy="vanilla")) as live:
        yield live


BAD_TEXT_REQUESTS = [
    ("empty text", text_request([""]), "text 0 is empty"),
    ("blank text", text_request(["ok", "   \n"]), "text 1 is empty"),
    ("not a string", text_request([12]), "not a string"),
    ("wrong dtype", {"inputs": [{"name": "text", "shape": [1], "datatype": "UINT8", "data": [1]}]}, "BYTES"),
    ("count mismatch", {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a"]}]}, "needs 2"),
    ("too many tokens", text_request(["word " * 20]), "21 tokens; the limit is 16"),
    ("too many characters", text_request(["x" * 501]), "501 characters; the limit is 500"),
]


@pytest.mark.parametrize("name,body,expect", BAD_TEXT_REQUESTS, ids=[b[0] for b in BAD_TEXT_REQUESTS])
def test_bad_text_request_is_a_clear_400(words, name, body, expect):
    with httpx.Client(base_url=words.url) as c:
        r = c.post("/v2/models/words/infer", json=body)
    assert r.status_code == 400, r.text
    assert expect in r.json()["error"]


def test_long_text_is_truncated_when_configured(tiny_text):
    from apparate.serve.control import ControlOptions

    with serving(served_text(tiny_text, long_text="truncate"), control_opts=ControlOptions(policy="vanilla")) as live:
        with httpx.Client(base_url=live.url) as c:
            long = "good " * 40
            r = c.post("/v2/models/words/infer", json=text_request([long]))
            cut = c.post("/v2/models/words/infer", json=text_request(["good " * 15]))  # 16 tokens with [CLS]
            assert r.status_code == 200, r.text
            assert r.json()["outputs"][0]["data"] == cut.json()["outputs"][0]["data"]
            assert c.post("/v2/models/words/infer", json=text_request(["x" * 501])).status_code == 400


DEEP = b'{"inputs": ' + b"[" * 1000 + b"]" * 1000 + b"}"


@pytest.mark.parametrize("server,body,expect", [
    ("cnn", DEEP, "nested too deeply"),
    ("cnn", b"[" * 50_000, "nested too deeply"),
    ("words", b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["\\ud800"]}]}',
     "text 0 is not valid Unicode"),
    ("words", b'{"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["fine", "a \\udfff b"]}]}',
     "text 1 is not valid Unicode"),
], ids=["nested 1000 deep", "50k open brackets", "lone surrogate", "lone low surrogate"])
def test_input_that_broke_the_parser_is_a_400_and_counted(request, server, body, expect):
    live = request.getfixturevalue(server)
    url = f"/v2/models/{live.served.name}/infer"

    def count(text: str, code: str) -> float:
        for line in text.splitlines():
            if line.startswith(f'apparate_http_requests_total{{code="{code}",route="infer"}}'):
                return float(line.split()[-1])
        return 0.0

    with httpx.Client(base_url=live.url) as c:
        before = count(c.get("/metrics").text, "400")
        r = c.post(url, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert expect in r.json()["error"]
        after = c.get("/metrics").text
        assert count(after, "400") == before + 1
        assert count(after, "500") == 0
        assert c.get("/v2/health/ready").status_code == 200


def test_every_error_is_counted_with_its_code_and_route(cnn):
    with httpx.Client(base_url=cnn.url) as c:
        assert c.get("/v2/models/tiny/infer").status_code == 405
        assert c.get("/nowhere").status_code == 404
        assert c.post("/v2/models/other/infer", json=image_request(1)).status_code == 404
        text = c.get("/metrics").text
    for series in ('{code="405",route="infer"}', '{code="404",route="other"}', '{code="404",route="infer"}'):
        assert f"apparate_http_requests_total{series}" in text, series
