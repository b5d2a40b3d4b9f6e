"""Serving under stress: admission before parsing, SLOs that fit the request, contention kept out
of the profile, liveness while one heavy request is decoded. Real servers on loopback, real
(tiny) models; batch times are made long on purpose with the model's sleeping module, so what
is asserted is behaviour (who is refused, when, with what), not speed."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import numpy as np

from .conftest import image_request, served_cnn, served_text, serving, text_request


def _static(site: int = 0, update_profile: bool = True):
    from apparate.core.controller import Config
    from apparate.serve.control import ControlOptions

    return ControlOptions(policy="static", initial=Config((site,), (0.0,)), profile_every_s=0.0,
                          update_profile=update_profile)


async def _burst(url: str, bodies: list) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=len(bodies))) as c:
        return await asyncio.gather(*(c.post(url, content=b, headers={"content-type": "application/json"})
                                      for b in bodies))


def test_admission_sheds_before_parsing_only_what_cannot_make_it(tiny_cnn):
    import json

    from apparate.serve.engine import EngineOptions
    from apparate.serve.scheduler import BatchingOptions

    served = served_cnn(tiny_cnn)
    slo_ms = 450.0
    opts = EngineOptions(batching=BatchingOptions("clockwork", max_batch=1), slo_ms=slo_ms, threads=1)
    with serving(served, opts, _static()) as live:
        served.ee.backbone.slow.delay = 0.1  # every batch (of one) takes 100 ms: 4 fit in the SLO
        url = live.model_url("/infer")
        with httpx.Client(timeout=30) as c:  # the engine learns how long batches take
            for s in range(6):
                assert c.post(url, json=image_request(1, seed=s)).status_code == 200
        good = json.dumps(image_request(1)).encode()
        # What the engine promises per batch now (the profile's time x the 90th percentile of how
        # much longer batches ran): on a loaded machine a 100 ms sleep overshoots, so fewer fit.
        per_batch_ms = live.engine.live.costs.drain_ms(1, None) * live.engine.margin
        fit = int(slo_ms // per_batch_ms)
        rs = asyncio.run(_burst(url, [good] * 12))
        codes = [r.status_code for r in rs]
        served_ok = [r for r in rs if r.status_code == 200]
        refused = [r for r in rs if r.status_code == 503]
        assert len(served_ok) + len(refused) == 12
        assert fit >= 2 and len(served_ok) >= fit - 1, (codes, per_batch_ms)  # what could make it was served ...
        assert all(r.json()["parameters"]["latency_ms"] <= slo_ms for r in served_ok)  # ... in time
        assert refused and all(r.json()["error"] == "overloaded" for r in refused), [r.text for r in refused]
        assert all(r.headers.get("retry-after") == "1" for r in refused)
        # Refused before the body is read: while the engine would refuse, a malformed body gets
        # the overload 503, not a 400. Admission fills the queue exactly to what the SLO allows,
        # so that state lasts only until the running batch's remaining time shrinks (a few ms):
        # it is made to last here by holding the measured slowdown high while one slow batch
        # runs (it is recomputed only when a batch ends).
        async def full_then_bad() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=12)) as c:
                served.ee.backbone.slow.delay = 1.0
                first = asyncio.create_task(c.post(url, content=good))
                end = time.monotonic() + 10
                while not live.engine.running_batch:
                    assert time.monotonic() < end, "the batch never started"
                    await asyncio.sleep(0.005)
                live.engine.margin = 1e3
                assert live.engine.admission.refusal() == "overloaded"
                bad = await asyncio.gather(*(c.post(url, content=b"{not json") for _ in range(3)))
                assert (await first).status_code in (200, 503)
                return list(bad)

        bad = asyncio.run(full_then_bad())
        assert [r.status_code for r in bad] == [503] * 3
        assert all(r.json()["error"] == "overloaded" for r in bad)
        served.ee.backbone.slow.delay = 0.0
        with httpx.Client(base_url=live.url) as c:
            assert c.post("/v2/models/tiny/infer", json=image_request(1)).status_code == 200
            st = c.get("/v2/models/tiny/earlyexit").json()
        assert st["dropped"].get("overloaded", 0) >= len(refused) + 3
        assert st["admission"]["shed"] is True and st["admission"]["slowdown"] > 1


def test_waiting_does_not_inflate_the_profile(tiny_cnn):
    """Under load the engine thread waits between torch ops: for the GIL while the event loop
    parses requests, for a core another process holds. Here it waits inside the model (the
    sleeping module: blocked, not computing) on every batch. The batches' wall time grows and
    admission sees it (slowdown); the profile, what a batch costs, does not follow it."""
    from apparate.core.controller import Config
    from apparate.serve.control import ControlOptions
    from apparate.serve.engine import Engine, EngineOptions
    from apparate.serve.scheduler import BatchingOptions

    served = served_cnn(tiny_cnn)
    engine = Engine(served, EngineOptions(batching=BatchingOptions(max_batch=4), slo_ms=60_000, threads=1),
                    ControlOptions(policy="static", initial=Config((0,), (0.0,)), profile_every_s=0.0)).start()
    try:
        imgs = [torch_image(i) for i in range(4)]
        for _ in range(20):
            [f.result(10) for f in engine.submit(imgs)]
        engine.flush()
        before = engine.control.profile.vanilla(4)
        served.ee.backbone.slow.delay = 0.01
        for _ in range(40):
            [f.result(10) for f in engine.submit(imgs)]
        served.ee.backbone.slow.delay = 0.0
        engine.flush()
        after = engine.control.profile.vanilla(4)
        assert engine.slowdown > 2  # batches took longer than the profile says ...
        # ... which did not take the 10 ms of waiting in: a profile that followed the wall time
        # would grow by 10 ms; CPU time itself varies on a shared machine (a loaded CI run once
        # measured +3.5 ms on this 1 ms batch), so the bound is half the wait
        assert after < before + 5.0, (before, after)
    finally:
        engine.stop()
        engine.executor.close()
        served.ee.remove_hooks()


def torch_image(seed: int):
    import torch

    return torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _slow_profile():
    """A synthetic profile (20 ms a batch of 8) for the tiny CNN's two sites."""
    from apparate.core.profile import LatencyProfile

    return LatencyProfile.linear(2, vanilla_ms=10.0, batch_sizes=(1, 2, 4, 8))


def test_the_auto_slo_fits_the_largest_request_and_too_large_ones_get_413(tiny_cnn):
    from apparate.serve.engine import EngineOptions
    from apparate.serve.scheduler import BatchingOptions
    from apparate.serve.server import auto_slo_ms

    prof = _slow_profile()
    auto = auto_slo_ms(prof, 8, None, max_inputs=64)
    assert auto >= 1.5 * 9 * prof.vanilla(8)  # one running batch ahead, then 8 batches of its own
    for slo, expect in ((auto, 200), (60.0, 413)):
        served = served_cnn(tiny_cnn, max_inputs=64)
        served.profile = prof
        opts = EngineOptions(batching=BatchingOptions("clockwork", max_batch=8), slo_ms=slo, threads=1,
                             calibrate_ramps=False)
        # The profile stays the synthetic one (the tiny model's real batches take well under 1 ms).
        with serving(served, opts, _static(update_profile=False)) as live, \
                httpx.Client(base_url=live.url, timeout=30) as c:
            for n in (48, 64):
                r = c.post("/v2/models/tiny/infer", json=image_request(n))
                if expect == 200:
                    assert r.status_code == 200, r.text
                    assert r.json()["parameters"]["inputs"] == n
                else:
                    assert r.status_code == 413, r.text  # never a retryable 503
                    err = r.json()["error"]
                    assert f"this request of {n} inputs needs about" in err and "more than the SLO of 60 ms" in err
                    assert "send at most 24 inputs per request" in err  # 3 batches of 8 at 17 ms fit in 60 ms
            assert c.post("/v2/models/tiny/infer", json=image_request(1)).status_code == 200
            if expect == 413:
                assert c.get("/v2/models/tiny/earlyexit").json()["dropped"] == {"too large": 48 + 64}


def test_liveness_answers_while_a_heavy_request_is_tokenized(tiny_text):
    """Tokenizing runs on a worker thread: a tokenizer that takes 0.8 s (releasing the GIL, as
    the Rust tokenizers do) does not hold up /v2/health/live."""
    from apparate.serve.app import create_app
    from apparate.serve.control import ControlOptions
    from apparate.serve.engine import Engine, EngineOptions
    from apparate.serve.server import ServerThread

    served = served_text(tiny_text)
    count = served.codec.count

    def slow_count(texts: list[str]) -> list[int]:
        if len(texts) > 1:
            time.sleep(0.8)
        return count(texts)

    served.codec.count = slow_count
    engine = Engine(served, EngineOptions(slo_ms=5000, threads=1), ControlOptions(policy="vanilla"))
    srv = ServerThread(create_app(engine, offload_bytes=300)).start()
    try:
        done: dict[str, float] = {}

        def heavy() -> None:
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                r = c.post("/v2/models/words/infer", json=text_request(["good film"] * 30))  # > 300 bytes
                done["heavy"] = time.perf_counter()
                done["code"] = r.status_code

        th = threading.Thread(target=heavy)
        th.start()
        time.sleep(0.2)  # the heavy request is being tokenized
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            t = time.perf_counter()
            assert c.get("/v2/health/live").json() == {"live": True}
            done["live"] = time.perf_counter()
            assert c.post("/v2/models/words/infer", json=text_request(["one short text"])).status_code == 200
            done["short"] = time.perf_counter()
        th.join()
        assert done["code"] == 200
        assert done["live"] < done["heavy"] and done["short"] < done["heavy"]
        assert done["live"] - t < 0.4  # well inside the 0.6 s the tokenizer still had to go
    finally:
        srv.stop()
        engine.executor.close()
        served.ee.remove_hooks()
