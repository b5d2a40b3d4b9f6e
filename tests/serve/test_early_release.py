"""An answer released at a ramp reaches its client while the batch is still running."""

from __future__ import annotations

import threading
import time

import httpx
import torch
from torch import nn

from .conftest import image_request, served_cnn, serving, wait_for


def test_answer_at_ramp_arrives_before_the_batch_ends(tiny_cnn):
    from apparate.core.controller import Config
    from apparate.serve.control import ControlOptions

    served = served_cnn(tiny_cnn)
    # Ramp at site 0 (b1) releases every input; the model then sleeps 300 ms before b2.
    with serving(served, control_opts=ControlOptions(policy="static", initial=Config((0,), (1.0,)),
                                                     update_profile=False)) as live:
        served.ee.backbone.slow.delay = 0.3
        with httpx.Client(base_url=live.url, timeout=10) as c:
            before = live.engine.batches
            t_sent = time.perf_counter()
            r = c.post("/v2/models/tiny/infer", json=image_request(1))
            t_answer = time.perf_counter()
            assert r.status_code == 200, r.text
            # The batch is still asleep when the answer is in: wait for it to end.
            assert wait_for(lambda: live.engine.batches > before, timeout=5)
            batch = live.engine.last_batch
        p = r.json()["parameters"]
        assert p["early_exit"] is True and p["exit_site"] == 0
        assert batch["start"] <= t_answer
        assert batch["end"] - t_answer >= 0.1, (batch, t_answer)  # >= 100 ms before its batch finished
        assert t_answer - t_sent < 0.25 and p["compute_ms"] < 250
        served.ee.backbone.slow.delay = 0.0


class PositionRamp(nn.Module):
    """A ramp confident (class 0, p ~ 1) for the batch positions in `confident`, unsure (1/3 each)
    elsewhere: which inputs exit is then known in advance."""

    def __init__(self, confident: set[int]) -> None:
        super().__init__()
        self.confident = confident

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        logits = torch.zeros(h.shape[0], 3)
        for i in self.confident:
            if i < h.shape[0]:
                logits[i, 0] = 20.0
        return logits


def test_inputs_of_one_batch_are_released_at_their_own_exit(tiny_cnn):
    """Two clients in one batch: the one confident at the ramp gets its answer >= 100 ms before
    the other, which waits for the end of the model; each is answered once."""
    from apparate.core.controller import Config
    from apparate.serve.control import ControlOptions
    from apparate.serve.engine import EngineOptions

    served = served_cnn(tiny_cnn)
    served.ee.set_ramp(0, PositionRamp({0}))
    with serving(served, EngineOptions(slo_ms=5000),
                 ControlOptions(policy="static", initial=Config((0,), (0.5,)), update_profile=False)) as live:
        eng = live.engine
        served.ee.backbone.slow.delay = 0.3
        go = threading.Event()
        served.ee.backbone.slow.hold = go  # the first batch waits until "a" and "b" are queued
        results: dict[str, tuple[float, dict]] = {}

        def call(name: str, seed: int) -> None:
            with httpx.Client(base_url=live.url, timeout=10) as c:
                r = c.post("/v2/models/tiny/infer", json=image_request(1, seed=seed))
                results[name] = (time.perf_counter(), r.json())

        # A first request keeps the worker busy (held, then 300 ms asleep) while "a" then "b" queue up; they
        # then run together, "a" at position 0 (confident), "b" at position 1 (not).
        first = threading.Thread(target=call, args=("first", 0))
        first.start()
        assert wait_for(lambda: eng.running_batch == 1, timeout=5)
        ta = threading.Thread(target=call, args=("a", 1))
        ta.start()
        assert wait_for(lambda: len(eng.queue) == 1, timeout=5)
        tb = threading.Thread(target=call, args=("b", 2))
        tb.start()
        assert wait_for(lambda: len(eng.queue) == 2, timeout=10)
        go.set()
        for t in (first, ta, tb):
            t.join(10)
        served.ee.backbone.slow.delay = 0.0
    pa, pb = results["a"][1]["parameters"], results["b"][1]["parameters"]
    assert pa["batch_size"] == pb["batch_size"] == 2
    assert (pa["early_exit"], pa["exit_site"]) == (True, 0) and pa["confidence"] > 0.99
    assert (pb["early_exit"], pb["exit_site"]) == (False, -1)
    assert results["b"][0] - results["a"][0] >= 0.1
    total = eng.metrics.snapshot()["total"]
    assert total["inputs"] == 3 and total["exits"] == {"0": 2, "final": 1}
