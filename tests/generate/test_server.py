"""The `/v1/completions` endpoint on a real uvicorn server on loopback, over the real model."""

from __future__ import annotations

import json
import threading

import pytest

from apparate.generate.lm import missing_extra

why = missing_extra()
if why:
    pytest.skip(why, allow_module_level=True)

import httpx  # noqa: E402

from apparate.core.controller import Controller  # noqa: E402
from apparate.core.settings import Settings  # noqa: E402
from apparate.core.types import Config  # noqa: E402
from apparate.generate.control import TokenTuner, step_profile  # noqa: E402
from apparate.generate.server import create_app  # noqa: E402

from ..serve.conftest import wait_for  # noqa: E402

COSTS = {"layer_ms": 1.0, "ramp_ms": 0.05, "head_ms": 8.0, "step_ms": 38.0}


class Gate:
    """Holds the decode thread at a request's second token until the client has read the first
    event, so the test fails (the gate times out) if the server buffered the answer."""

    def __init__(self, scheduler):
        self.first_read = threading.Event()
        self.armed = False
        self.held = False
        self.timed_out = False
        inner = scheduler.submit

        def submit(req):
            count = [0]
            on_emit = req.on_emit

            def emit(t):
                count[0] += 1
                if count[0] == 2 and self.armed and not self.held:
                    self.held = True
                    self.timed_out = not self.first_read.wait(120)
                on_emit(t)
            req.on_emit = emit
            return inner(req)
        scheduler.submit = submit


@pytest.fixture(scope="module")
def server(lm, lens):
    from apparate.serve.server import ServerThread

    ctl = Controller(step_profile(lens.layers, COSTS), Settings(), Config((6,), (0.2,)))
    tuner = TokenTuner(lm, lens, ctl)
    app = create_app(tuner, max_tokens_limit=16)
    gate = Gate(app.state.scheduler)
    srv = ServerThread(app).start(timeout=120)
    yield srv.url, gate, tuner
    srv.stop(30)


def test_completion_streams_each_token_as_it_is_released(server):
    url, gate, tuner = server
    before = tuner.controller.window.written
    gate.armed = True
    events = []
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", url + "/v1/completions",
                           json={"prompt": "Name a famous film.", "max_tokens": 6, "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                gate.first_read.set()  # the first event reached the client mid-decode
    assert gate.held and not gate.timed_out
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] in ("stop", "length")
    n = last["usage"]["completion_tokens"]
    assert 1 <= n <= 6 and len(chunks) == n + 1  # one event per token, then the summary
    assert len(last["apparate"]["exit_layers"]) == n
    assert tuner.controller.window.written - before == n - 1  # the tokens fed the controller


def test_completion_without_streaming(server):
    url, _, _ = server
    r = httpx.post(url + "/v1/completions", json={"prompt": "Say hello.", "max_tokens": 4}, timeout=120)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and isinstance(body["choices"][0]["text"], str)
    assert body["usage"]["completion_tokens"] <= 4
    state = httpx.get(url + "/v1/apparate/state", timeout=30).json()
    assert state["mode"].startswith("ramps on") and state["config"]["sites"] == [6]


def test_sampled_completions_repeat_with_their_seed(server):
    url, _, _ = server
    ask = lambda seed: httpx.post(url + "/v1/completions", timeout=120, json={  # noqa: E731
        "prompt": "Name a colour.", "max_tokens": 6, "temperature": 1.0, "seed": seed}).json()
    a, b = ask(3), ask(3)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert a["apparate"]["agree_with_deep"] <= a["usage"]["completion_tokens"]


@pytest.mark.parametrize("body, msg", [
    ({"prompt": "", "max_tokens": 4}, "prompt must be a non-empty string"),
    ({"prompt": "   "}, "prompt must be a non-empty string"),
    ({"prompt": "hi", "max_tokens": 17}, "max_tokens must be an integer from 1 to 16"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens must be an integer from 1 to 16"),
    ({"prompt": "hi", "max_tokens": 4, "stream": "yes"}, "stream must be true or false"),
    ({"prompt": "hi", "max_tokens": 4.5}, "max_tokens must be an integer"),
    ({"prompt": "hi " * 1100, "max_tokens": 4}, "at most 1024"),
    ({"prompt": "hi", "max_tokens": 4, "temperature": -1}, "temperature must be a number"),
    ({"prompt": "hi", "max_tokens": 4, "temperature": "hot"}, "temperature must be a number"),
    ({"prompt": "hi", "max_tokens": 4, "temperature": 0.7, "seed": -3}, "seed must be a non-negative integer"),
    ([1, 2], "JSON object"),
])
def test_bad_input_is_a_clear_400(server, body, msg):
    url, _, _ = server
    r = httpx.post(url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400 and msg in r.json()["error"]
    r = httpx.post(url + "/v1/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "not JSON" in r.json()["error"]


PROMPTS = ["Name a famous film.", "Say hello.", "What colour is the sky? Answer in one short sentence.",
           "Count to three."]


def test_concurrent_streaming_clients_each_get_their_own_completion(lm, lens):
    """Four streaming clients at once, decoded in one batch (the scheduler is held until all four
    wait, so they certainly share steps); ramps off, so each completion must be exactly the
    sequence's greedy decoding alone."""
    from apparate.generate.decode import generate
    from apparate.serve.server import ServerThread

    ctl = Controller(step_profile(lens.layers, COSTS), Settings(), Config((), ()))
    app = create_app(TokenTuner(lm, lens, ctl), max_tokens_limit=16, max_batch=4)
    scheduler = app.state.scheduler
    results: dict[int, list] = {}

    def client(k: int) -> None:
        events = []
        with httpx.Client(timeout=120) as c:
            with c.stream("POST", url + "/v1/completions",
                          json={"prompt": PROMPTS[k], "max_tokens": 5 + k, "stream": True}) as r:
                assert r.status_code == 200
                events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        results[k] = events

    with ServerThread(app).start(timeout=120) as srv:
        url = srv.url
        scheduler.pause()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        assert wait_for(lambda: scheduler.waiting.qsize() >= 4, timeout=120)
        scheduler.resume()
        for t in threads:
            t.join(180)
        state = httpx.get(url + "/v1/apparate/state", timeout=30).json()
    assert state["batching"]["largest_batch"] == 4
    for k in range(4):
        events = results[k]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        text = "".join(c["choices"][0]["text"] for c in chunks)
        alone = generate(lm, lm.chat_ids(PROMPTS[k]), 5 + k)
        assert text == lm.tokenizer.decode([t.token for t in alone.tokens], skip_special_tokens=True)
        assert chunks[-1]["usage"]["completion_tokens"] == len(alone.tokens)
    assert ctl.window.written > 0  # finished sequences fed the controller
