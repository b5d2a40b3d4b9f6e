"""Faults inside the model and shutdown with requests in flight."""

from __future__ import annotations

import asyncio

import httpx
import torch
from torch import nn

from .conftest import image_request, served_cnn, serving, wait_for


class FlakyRamp(nn.Module):
    """Wraps a ramp; raises while `armed`."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.armed = False

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.armed:
            raise RuntimeError("ramp failure on purpose")
        return self.inner(h, mask)


def _early_everywhere():
    from apparate.core.controller import Config
    from apparate.serve.control import ControlOptions

    return ControlOptions(policy="static", initial=Config((0,), (1.0,)))


def test_a_failing_ramp_serves_the_batch_without_early_exits(tiny_cnn):
    served = served_cnn(tiny_cnn)
    flaky = FlakyRamp(served.ee.ramps[0])
    served.ee.set_ramp(0, flaky)
    with serving(served, control_opts=_early_everywhere()) as live, httpx.Client(base_url=live.url) as c:
        assert c.post("/v2/models/tiny/infer", json=image_request(1)).json()["parameters"]["early_exit"] is True
        flaky.armed = True
        r = c.post("/v2/models/tiny/infer", json=image_request(3))
        assert r.status_code == 200
        assert r.json()["parameters"]["exit_sites"] == "-1,-1,-1"  # answered by the model's own output
        flaky.armed = False
        assert c.post("/v2/models/tiny/infer", json=image_request(1)).json()["parameters"]["exit_site"] == 0
        st = c.get("/v2/models/tiny/earlyexit").json()
        assert st["errors"] == {"ramp": 1}
        assert 'apparate_errors_total{kind="ramp"} 1.0' in c.get("/metrics").text


def test_a_failing_model_answers_500_and_the_server_carries_on(tiny_cnn):
    from apparate.serve.control import ControlOptions

    served = served_cnn(tiny_cnn)
    with serving(served, control_opts=ControlOptions(policy="vanilla")) as live, httpx.Client(base_url=live.url) as c:
        served.ee.backbone.boom.armed = True
        r = c.post("/v2/models/tiny/infer", json=image_request(2))
        assert r.status_code == 500 and "model error: RuntimeError: backbone failure on purpose" in r.json()["error"]
        served.ee.backbone.boom.armed = False
        assert c.post("/v2/models/tiny/infer", json=image_request(1)).status_code == 200
        assert c.get("/v2/models/tiny/earlyexit").json()["errors"] == {"model": 1}
        assert c.get("/v2/health/ready").status_code == 200


def test_answers_released_before_a_model_failure_stand(tiny_cnn):
    served = served_cnn(tiny_cnn)
    with serving(served, control_opts=_early_everywhere()) as live, httpx.Client(base_url=live.url) as c:
        served.ee.backbone.boom.armed = True  # fails after site 0, whose ramp released both inputs
        r = c.post("/v2/models/tiny/infer", json=image_request(2))
        assert r.status_code == 200 and r.json()["parameters"]["exit_sites"] == "0,0"
        # The answers came before the failure; let the batch fail (and be retried) before disarming.
        assert wait_for(lambda: live.engine.running_batch == 0 and live.engine.batches >= 1)
        served.ee.backbone.boom.armed = False
        assert c.get("/v2/models/tiny/earlyexit").json()["errors"] == {"model": 1}


def test_graceful_shutdown_answers_what_is_in_flight(tiny_cnn):
    from apparate.serve.app import create_app
    from apparate.serve.control import ControlOptions
    from apparate.serve.engine import Engine, EngineOptions
    from apparate.serve.scheduler import BatchingOptions
    from apparate.serve.server import ServerThread

    served = served_cnn(tiny_cnn)
    engine = Engine(served, EngineOptions(batching=BatchingOptions(max_batch=2), slo_ms=60_000),
                    ControlOptions(policy="vanilla"))
    srv = ServerThread(create_app(engine)).start()
    served.ee.backbone.slow.delay = 0.2
    url = f"{srv.url}/v2/models/tiny/infer"

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as c:
            tasks = [asyncio.create_task(c.post(url, json=image_request(1, seed=i))) for i in range(6)]
            while engine.running_batch == 0:  # the first batch is running, the rest queued
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            stopper = asyncio.create_task(asyncio.to_thread(srv.stop))
            rs = await asyncio.gather(*tasks)
            await stopper
            return rs

    rs = asyncio.run(go())
    assert [r.status_code for r in rs] == [200] * 6
    assert not engine.running and engine.metrics.snapshot()["total"]["inputs"] == 6
    try:
        httpx.get(srv.url + "/v2/health/live", timeout=2)
        raise AssertionError("the server should be closed")
    except httpx.HTTPError:
        pass
    engine.executor.close()
