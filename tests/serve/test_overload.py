"""Overload: 503s with a reason, bounded memory, no crash, normal answers afterwards."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from .conftest import image_request, served_cnn, serving, wait_for


async def _burst(url: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=n)) as c:
        return await asyncio.gather(*(c.post(url, json=image_request(1, seed=i)) for i in range(n)))


def _static():
    from apparate.core.controller import Config
    from apparate.serve.control import ControlOptions

    return ControlOptions(policy="static", initial=Config((0,), (0.0,)))


def test_full_queue_refuses_with_503_then_recovers(tiny_cnn):
    from apparate.serve.engine import EngineOptions
    from apparate.serve.scheduler import BatchingOptions

    served = served_cnn(tiny_cnn)
    opts = EngineOptions(batching=BatchingOptions("clockwork", max_batch=2), slo_ms=60_000, max_queue=4)
    with serving(served, opts, _static()) as live:
        served.ee.backbone.slow.delay = 0.2
        rs = asyncio.run(_burst(live.model_url("/infer"), 16))
        codes = [r.status_code for r in rs]
        assert set(codes) <= {200, 503}
        full = [r for r in rs if r.status_code == 503]
        assert full and all(r.json()["error"] == "queue full" for r in full)
        assert codes.count(200) >= 4  # what was admitted was served
        served.ee.backbone.slow.delay = 0.0
        with httpx.Client(base_url=live.url) as c:
            assert c.post("/v2/models/tiny/infer", json=image_request(2)).status_code == 200
            st = c.get("/v2/models/tiny/earlyexit").json()
            assert st["dropped"] == {"queue full": len(full)} and st["errors"] == {}
            assert f'apparate_dropped_total{{reason="queue full"}} {float(len(full))}' in c.get("/metrics").text
            assert c.get("/v2/health/ready").status_code == 200


def test_requests_that_cannot_meet_the_slo_get_503_late(tiny_cnn):
    from apparate.serve.engine import EngineOptions
    from apparate.serve.scheduler import BatchingOptions

    for kind in ("clockwork", "tfserving"):
        served = served_cnn(tiny_cnn)
        opts = EngineOptions(batching=BatchingOptions(kind, max_batch=2, batch_timeout_ms=1.0), slo_ms=150)
        with serving(served, opts, _static()) as live:
            served.ee.backbone.slow.delay = 0.25  # every batch takes longer than the SLO
            rs = asyncio.run(_burst(live.model_url("/infer"), 12))
            late = [r for r in rs if r.status_code == 503]
            assert late, kind
            # refused at admission once batches are seen to be slow, else dropped at batch time
            assert all(r.json()["error"] in ("late", "predicted late", "overloaded") for r in late)
            assert all(r.status_code in (200, 503) for r in rs)
            served.ee.backbone.slow.delay = 0.0
            assert wait_for(lambda: live.engine.running_batch == 0)
            with httpx.Client(base_url=live.url) as c:
                assert c.post("/v2/models/tiny/infer", json=image_request(1)).status_code == 200
                dropped = c.get("/v2/models/tiny/earlyexit").json()["dropped"]
                assert sum(dropped.get(k, 0) for k in ("late", "predicted late", "overloaded")) == len(late)


def test_without_shedding_late_requests_are_served_late(tiny_cnn):
    from apparate.serve.engine import EngineOptions
    from apparate.serve.scheduler import BatchingOptions

    served = served_cnn(tiny_cnn)
    opts = EngineOptions(batching=BatchingOptions("clockwork", max_batch=4, shed=False), slo_ms=100)
    with serving(served, opts, _static()) as live:
        served.ee.backbone.slow.delay = 0.15
        rs = asyncio.run(_burst(live.model_url("/infer"), 8))
        served.ee.backbone.slow.delay = 0.0
    assert [r.status_code for r in rs] == [200] * 8
    assert max(r.json()["parameters"]["latency_ms"] for r in rs) > 100


def test_the_automatic_slo_fits_the_largest_request_as_served_here(tiny_cnn):
    """A server whose batches run far slower than its bundle's profile says (as a loaded
    machine, or the engine's own costs, make them): the SLO derived from the profile alone
    would admit a request of 32 inputs and then drop it late. Measured at start, the SLO fits it."""
    import functools

    from apparate.serve.engine import EngineOptions
    from apparate.serve.scheduler import BatchingOptions
    from apparate.serve.server import auto_slo_ms

    served = served_cnn(tiny_cnn)
    served.ee.backbone.slow.delay = 0.03  # every batch: 30 ms more than profiled
    auto = functools.partial(auto_slo_ms, served.profile, 8, None, 32, None)  # scale: the one argument left
    opts = EngineOptions(batching=BatchingOptions("clockwork", max_batch=8), slo_ms=auto(1.0), slo_auto=auto,
                         threads=1)
    with serving(served, opts, _static()) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        slo = live.engine.options.slo_ms
        assert slo > auto(1.0)  # re-derived from the batches measured at start
        r = c.post("/v2/models/tiny/infer", json=image_request(32))
        assert r.status_code == 200, r.text
        assert r.json()["parameters"]["latency_ms"] <= slo


@settings(max_examples=200, deadline=None)
@given(st.floats(1.0, 2000.0), st.floats(0.0, 20000.0), st.integers(1, 8))
def test_the_capacity_search_finds_a_rate_above_its_closed_loop_estimate(closed, capacity, steps):
    """`bench overload`'s search, for a server that passes every rate up to `capacity`: it never
    returns a failing rate, and unless the capacity is out of its reach (below the range's
    bottom, or past six doublings) it ends within one bisection interval of it, however far
    the closed loop's estimate under-read it."""
    from apparate.bench.overload import search_rate

    tried: list[float] = []

    def within(rate: float, k: int) -> bool:
        tried.append(rate)
        return rate <= capacity

    found = search_rate(within, closed, steps)
    c = max(closed, 1.0)
    assert len(tried) == len(set(tried))  # no rate probed twice
    if capacity < 0.3 * c:
        assert found == pytest.approx(0.3 * c)  # nothing passes: the range's bottom
        return
    assert found <= capacity
    if capacity < 1.2 * c * 2 ** 6:
        k = 0  # the doublings that passed: the capacity then lies in the range they left
        while k < 6 and 1.2 * c * 2 ** k <= capacity:
            k += 1
        width = 0.9 * c if k == 0 else 1.2 * c * 2 ** (k - 1)
        assert capacity - found <= width / 2 ** steps * (1 + 1e-9)
