"""Heads that keep learning in a live server (`apparate+heads`, real model passes on the tiny CNN and the tiny text model):
the heads learn from the served stream, a new head reaches the model only between batches (each
batch's answers at a site are exactly one version's head), the controller's window is re-scored
with it, and what the server cannot honour is refused."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from apparate.core.controller import Config
from apparate.core.heads import head_scores
from apparate.core.settings import Settings

from .conftest import WORDS, WordTokens, served_cnn, served_text


def _inputs(kind: str, seed: int, n: int) -> tuple[list, list[int] | None]:
    if kind == "image":
        return [np.random.default_rng(seed + i).integers(0, 256, (8, 8, 3), dtype=np.uint8) for i in range(n)], None
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 10)))) for _ in range(n)]
    return texts, WordTokens().count(texts)


@pytest.mark.parametrize("kind", ["image", "text"])
def test_heads_learn_live_and_every_batch_sees_one_version(kind, request):
    from apparate.policies.heads import LiveHeadsPolicy, linear_heads
    from apparate.serve.control import ControlOptions
    from apparate.serve.describe import describe
    from apparate.serve.engine import Engine, EngineOptions
    from apparate.serve.scheduler import BatchingOptions

    # the tiny CNN's ramps are `pool` ramps (a spatial mean), the tiny text model's `cls` ones
    served = served_cnn(request.getfixturevalue("tiny_cnn")) if kind == "image" else \
        served_text(request.getfixturevalue("tiny_text"))
    bundle_heads = linear_heads(served.ee)
    assert all(h is not None for h in bundle_heads)
    # a candidate every 16 inputs per site, and one that always goes live (gain -1): many swaps
    settings = Settings.for_kind(kind, head_every=16, head_buffer=64, head_gain=-1.0, ramp_budget=0.9,
                                 adjust_every_batches=10**6)
    eng = Engine(served, EngineOptions(BatchingOptions("clockwork", 8, shed=False), slo_ms=1e6, threads=1),
                 ControlOptions(policy="apparate+heads", settings=settings, feedback_min_inputs=8,
                                initial=Config((0, 1), (0.0, 0.0))))
    policy = eng.control.policy
    assert isinstance(policy, LiveHeadsPolicy)
    reports = []
    submit = eng.control.submit
    eng.control.submit = lambda rep: (reports.append(rep), submit(rep))[1]
    try:
        eng.start()
        for k in range(6):  # in rounds, so that new heads are published while the server runs
            futs = eng.submit(*_inputs(kind, 100 * k, 40))
            assert eng.flush(60)
            for f in futs:
                f.result(timeout=60)
            eng.control.flush()
        shown = describe(eng)["heads"]  # what GET .../earlyexit shows
        assert shown == {"version": eng.live.heads.version, "changed_sites": sorted(eng.live.heads.heads),
                         "swaps": policy.swaps}
    finally:
        eng.stop()
        eng.executor.close()
    served.ee.remove_hooks()
    assert policy.swaps >= 2 and policy.version >= 2
    served_versions = [r.heads_version for r in reports if r.pooled is not None]
    assert len(served_versions) == len(reports) and served_versions == sorted(served_versions)
    assert len(set(served_versions)) >= 2  # new heads reached the model while it served
    for rep in reports:
        table = policy.history[rep.heads_version]
        for j, s in enumerate(rep.sites):
            w, b = table.heads.get(s, bundle_heads[s])
            c, p = head_scores(rep.pooled[j], w, b)
            # the whole batch answered by that version's head at this site, no other
            assert np.allclose(c, rep.conf[:, j], atol=1e-4)
            assert np.array_equal(p == rep.final, rep.agree[:, j])
    # the window's rows at a learning site are the current head's view of their features
    win, ctl = policy.controller.window, policy.controller
    for s, learner in policy.learners.items():
        rows = win.last(min(win.written, win.size))
        have = policy._have[rows, s] & ~np.isnan(win.conf[rows, s])
        if have.any():
            c, p = head_scores(policy._feat[s][rows[have]], learner.w, learner.b)
            assert np.allclose(win.conf[rows[have], s], c, atol=1e-9)
            assert np.array_equal(win.agree[rows[have], s], p == policy._final[rows[have]])
    assert any(e.kind == "tune" and "new heads" in e.detail for e in ctl.events)


class _OpaqueRamp(torch.nn.Module):
    """A ramp the server can run but whose head it cannot retrain alone (not one linear layer)."""

    def __init__(self, ramp: torch.nn.Module) -> None:
        super().__init__()
        self.inner = ramp

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner(h, mask)


def test_a_bundle_without_linear_heads_and_what_cannot_be_honoured_are_refused(tiny_cnn, tmp_path):
    from apparate.serve.control import ControlOptions
    from apparate.serve.engine import Engine, EngineOptions

    served = served_cnn(tiny_cnn)
    for s in range(served.ee.num_sites):
        served.ee.set_ramp(s, _OpaqueRamp(served.ee.ramps[s]))
    try:
        with pytest.raises(ValueError, match="linear heads"):
            Engine(served, EngineOptions(slo_ms=1e6, threads=1), ControlOptions(policy="apparate+heads"))
    finally:
        served.ee.remove_hooks()
    for args in (["--early-stop"], ["--ray"]):
        r = subprocess.run([sys.executable, "-m", "apparate", "serve", str(tmp_path / "nope"), "--port", "0",
                            "--policy", "apparate+heads", *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "apparate+heads" in r.stderr, r.stderr


def test_learned_heads_are_checkpointed_and_loaded_again_at_a_restart(tiny_cnn, tmp_path):
    from apparate.serve.control import ControlOptions
    from apparate.serve.engine import Engine, EngineOptions
    from apparate.serve.scheduler import BatchingOptions

    settings = Settings.for_kind("image", head_every=16, head_buffer=64, head_gain=-1.0, ramp_budget=0.9,
                                 adjust_every_batches=10**6)
    state = tmp_path / "state"

    def engine() -> Engine:
        return Engine(served_cnn(tiny_cnn), EngineOptions(BatchingOptions("clockwork", 8, shed=False), slo_ms=1e6,
                                                          threads=1),
                      ControlOptions(policy="apparate+heads", settings=settings, feedback_min_inputs=8,
                                     initial=Config((0, 1), (0.0, 0.0)), state_dir=str(state)))

    def serve(eng: Engine, n: int, seed: int) -> None:
        futs = eng.submit([np.random.default_rng(seed + i).integers(0, 256, (8, 8, 3), dtype=np.uint8)
                           for i in range(n)])
        assert eng.flush(60)
        for f in futs:
            f.result(timeout=60)
        eng.control.flush()

    first = engine()
    try:
        first.start()
        serve(first, 120, 0)
        saved = first.control.policy.table()
        assert saved.version >= 1 and saved.heads
        first.control.checkpoint()
    finally:
        first.stop()
        first.executor.close()
        first.served.ee.remove_hooks()
    again = engine()
    try:
        policy = again.control.policy
        assert policy.version == saved.version and set(policy.table().heads) == set(saved.heads)
        assert "heads v" in again.control.restored["what"]
        again.start()
        serve(again, 8, 1000)  # the first batch loads them into the model
        for s, (w, b) in saved.heads.items():
            head = again.served.ee.ramps[s].head
            assert torch.allclose(head.weight.double(), torch.as_tensor(w), atol=1e-6)
            assert torch.allclose(head.bias.double(), torch.as_tensor(b), atol=1e-6)
    finally:
        again.stop()
        again.executor.close()
        again.served.ee.remove_hooks()
    # heads that do not fit this model are refused, and the bundle's are used
    with pytest.raises(ValueError, match="does not fit"):
        policy.restore_heads({"version": 3, "heads": {"0": {"w": [[1.0]], "b": [0.0]}}})
