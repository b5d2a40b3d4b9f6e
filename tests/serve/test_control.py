"""Feedback from served batches changes the thresholds; measured times update the profile."""

from __future__ import annotations

import httpx

from .conftest import image_request, served_cnn, serving, wait_for


def small_settings(**kw):
    from apparate.core.settings import Settings

    # The tiny test model's ramps cost a large share of its pass once calibrated as paid, and on a
    # busy machine the two together can measure more than a whole pass: these tests are about
    # control, so the budget admits both ramps whatever the timing (the core tests the budget).
    base = dict(window_inputs=128, recent_inputs=32, min_tune_inputs=16, retune_every_inputs=32,
                adjust_every_batches=10_000, accuracy_constraint=0.05, margin_z=0.5,
                min_evidence_inputs=16, ramp_budget=100.0)
    return Settings(**{**base, **kw})


def test_feedback_changes_thresholds_over_time(tiny_cnn):
    from apparate.core.controller import Config
    from apparate.serve.control import ControlOptions

    served = served_cnn(tiny_cnn)
    # Site 0's ramp agrees with the model; site 1's does not (see the bootstrap recording). Start
    # with them the wrong way round: site 0 never releases, site 1 releases everything.
    rec = tiny_cnn.bundle.recording
    assert rec.agree[:, 0].mean() > 0.9 and rec.agree[:, 1].mean() < 0.5
    start = Config((0, 1), (0.0, 1.0))
    control = ControlOptions(policy="apparate", settings=small_settings(), initial=start)
    with serving(served, control_opts=control) as live, httpx.Client(base_url=live.url) as c:
        from apparate.policies import AdaptivePolicy

        assert isinstance(live.engine.control.policy, AdaptivePolicy)  # what replay runs, fed by the server
        assert c.get("/v2/models/tiny/earlyexit").json()["config"]["version"] == 0
        first = c.post("/v2/models/tiny/infer", json=image_request(8, seed=100)).json()
        assert first["parameters"]["exit_sites"] == ",".join(["1"] * 8)  # served with the start config
        history = []
        for s in range(16):
            r = c.post("/v2/models/tiny/infer", json=image_request(8, seed=s))
            assert r.status_code == 200
            st = c.get("/v2/models/tiny/earlyexit").json()
            history.append((st["config"]["version"], tuple(st["config"]["thresholds"])))
        assert live.engine.flush()
        st = c.get("/v2/models/tiny/earlyexit").json()
        last = c.post("/v2/models/tiny/infer", json=image_request(8, seed=200)).json()
    thr = st["config"]["thresholds"]
    assert history[-1][0] > 0 and history[-1][1] != start.thresholds  # changed while serving
    assert thr[0] > 0.0  # the ramp that agrees now releases (first: site 1 is never reached)
    assert any(e["kind"] in ("tune", "violation", "emergency") for e in st["control"]["events"])
    # Releases moved from the ramp that disagrees to the one that agrees. How many of the last 8
    # leave at site 0 depends on the tuned threshold, which depends on how feedback happened to
    # be pooled (timing): so not all 8 are required.
    exits = last["parameters"]["exit_sites"].split(",")
    assert "1" not in exits and "0" in exits, (st["config"], st["control"]["events"])
    assert not any(e["kind"] == "remove" for e in st["control"]["events"])


def test_the_window_guard_shows_on_earlyexit(tiny_cnn):
    # Site 1's ramp disagrees with the model on most inputs and releases everything at the start:
    # the wrong answers it served are what the guard counts, and /earlyexit shows them.
    from apparate.core.controller import Config
    from apparate.serve.control import ControlOptions

    served = served_cnn(tiny_cnn)
    control = ControlOptions(policy="apparate", settings=small_settings(guard_window=64),
                             initial=Config((0, 1), (0.0, 1.0)))
    with serving(served, control_opts=control) as live, httpx.Client(base_url=live.url) as c:
        for seed in range(6):  # 48 inputs: more than the controller pools before it looks
            assert c.post("/v2/models/tiny/infer", json=image_request(8, seed=seed)).status_code == 200
        assert live.engine.flush()

        def guard():  # the statistics are refreshed at most every 0.2 s
            return c.get("/v2/models/tiny/earlyexit").json()["control"]["controller"]["guard"]

        assert wait_for(lambda: guard()["wrong"] >= 1), guard()
        g = guard()
    assert g["window"] == 64 and g["spends"] < 0.05


def test_measured_times_update_the_profile(tiny_cnn):
    from apparate.serve.control import ControlOptions

    from apparate.core.controller import Config

    served = served_cnn(tiny_cnn)
    before = tiny_cnn.bundle.profile
    control = ControlOptions(policy="static", initial=Config((0, 1), (0.0, 0.0)),  # both ramps run, none exits
                             profile_every_s=0.0)
    with serving(served, control_opts=control) as live, httpx.Client(base_url=live.url) as c:
        served.ee.backbone.slow.spin = 0.03  # this "machine" is slower than when it was profiled
        for s in range(6):
            assert c.post("/v2/models/tiny/infer", json=image_request(4, seed=s)).status_code == 200
        served.ee.backbone.slow.spin = 0.0
        assert live.engine.flush()
        after = live.engine.control.profile
        costs = live.engine.live.costs
    # The backbone to site 1 now includes the 30 ms of computing; site 0 (before it) does not.
    assert after.at(4)[0][1] > before.at(4)[0][1] + 10
    assert after.at(4)[0][0] < before.at(4)[0][0] + 10
    assert after.vanilla(4) > before.vanilla(4) + 10
    assert costs.batch_ms(4) > before.table(4, live.engine.live.config.sites).end_ms + 10
    assert live.engine.control.overhead_ms >= 0


def test_the_server_runs_the_policies_replay_runs(tiny_cnn):
    """`serve --policy branchynet+` serves every ramp with the thresholds the replay catalog tunes
    on the same bootstrap; what cannot be served says why."""
    import numpy as np
    import pytest

    from apparate.core.tuning import greedy_thresholds, shared_threshold
    from apparate.policies import ThresholdPolicy
    from apparate.serve.control import ControlOptions

    rec = tiny_cnn.bundle.recording
    prof = tiny_cnn.bundle.profile
    S = prof.num_sites
    for name, search in (("branchynet+", greedy_thresholds), ("branchynet", shared_threshold)):
        served = served_cnn(tiny_cnn)
        with serving(served, control_opts=ControlOptions(policy=name, settings=small_settings())) as live, \
                httpx.Client(base_url=live.url) as c:
            st = c.get("/v2/models/tiny/earlyexit").json()
            assert st["policy"] == name and st["config"]["sites"] == list(range(S))
            pol = live.engine.control.policy  # the catalog's own class, behind the shared verbs
            assert isinstance(pol, ThresholdPolicy) and not pol.adaptive and pol.config == live.engine.live.config
            length = None if rec.lengths is None else float(np.mean(rec.lengths))
            want = search(rec.conf, rec.agree, prof.table(1.0, list(range(S)), length), 0.05).thresholds
            assert np.allclose(st["config"]["thresholds"], want)
            if name == "branchynet":
                assert len(set(st["config"]["thresholds"])) == 1  # one shared threshold
            r = c.post("/v2/models/tiny/infer", json=image_request(8, seed=3)).json()
            exits = [int(e) for e in r["parameters"]["exit_sites"].split(",")]
            assert all(e in (-1, *range(S)) for e in exits)
            assert live.engine.flush()
            assert c.get("/v2/models/tiny/earlyexit").json()["config"]["thresholds"] == st["config"]["thresholds"]
    for name, why in (("branchynet+opt", "hindsight"), ("optimal", "oracle"), ("deebert", "separate"),
                      ("nope", "not a policy")):
        with pytest.raises(ValueError, match=why):
            ControlOptions(policy=name)


def test_every_served_batch_reaches_the_controller_as_served(tiny_cnn):
    """By default the controller takes each batch's feedback as it was served, as the replay
    does, so a server and its replay reach the same decisions: one controller step per batch."""
    from apparate.core.controller import Config
    from apparate.serve.control import ControlOptions

    served = served_cnn(tiny_cnn)
    opts = ControlOptions(policy="apparate", settings=small_settings(), initial=Config((0, 1), (0.3, 0.3)))
    assert opts.feedback_min_inputs == 1
    with serving(served, control_opts=opts) as live, httpx.Client(base_url=live.url) as c:
        sizes = [1, 3, 2, 1, 4]
        for k, n in enumerate(sizes):  # one request at a time: each is its own batch
            assert c.post("/v2/models/tiny/infer", json=image_request(n, seed=k)).status_code == 200
            assert live.engine.flush()  # its feedback handled before the next: no backlog to merge
        ctl = live.engine.control.controller
        assert live.engine.batches == len(sizes)
        assert ctl.stats()["batches"] == len(sizes)  # none merged
        assert ctl.window.written - ctl._seeded == sum(sizes)  # every input is in the window


def test_the_pool_merges_only_a_backlog_and_loses_nothing_at_a_change(tiny_cnn):
    """Reports are merged only while more wait behind them (up to BACKLOG_INPUTS inputs), or
    under `feedback_min_inputs`; a report served with another configuration closes the pool
    before it, which is given as its own feedback (nothing discarded), in serving order."""
    import numpy as np

    from apparate.core.controller import Config
    from apparate.serve.control import BACKLOG_INPUTS, ControlOptions
    from apparate.serve.executor import BatchReport

    served = served_cnn(tiny_cnn)
    a, b = Config((0, 1), (0.3, 0.3), 0), Config((0, 1), (0.4, 0.3), 1)

    def report(cfg: Config, n: int = 2) -> BatchReport:
        conf = np.tile([[0.1, 0.1]], (n, 1))  # nothing released early: every answer "right"
        return BatchReport(cfg.sites, cfg.thresholds, cfg.version, conf, np.ones((n, 2), dtype=bool),
                           np.full(n, 2), np.ones(n, dtype=bool), np.zeros(n), n, None)

    with serving(served, control_opts=ControlOptions(policy="apparate", initial=a)) as live:
        ctl = live.engine.control
        assert [f.batch_size for f in ctl._pool_feedback(report(a))] == [2]  # no backlog: at once
        assert ctl._pool_feedback(report(a), backlog=True) == []  # another report waits: merged
        assert ctl._pool_feedback(report(a, 3), backlog=True) == []
        got = ctl._pool_feedback(report(a))  # the backlog is gone: the pool goes as one
        assert [f.batch_size for f in got] == [2 + 3 + 2]
        ctl._pool_feedback(report(a), backlog=True)
        got = ctl._pool_feedback(report(b), backlog=True)  # another configuration: the pool before it goes
        assert [(f.thresholds, f.batch_size) for f in got] == [(a.thresholds, 2)]
        assert [r.thresholds for r in ctl._pending] == [b.thresholds]
        got = ctl._pool_feedback(report(b, BACKLOG_INPUTS), backlog=True)  # the backlog's cap
        assert [f.batch_size for f in got] == [2 + BACKLOG_INPUTS] and ctl._pending == []


def test_a_wrong_early_answer_reaches_the_controller_without_waiting_for_the_pool(tiny_cnn):
    """Feedback is pooled into controller batches of `feedback_min_inputs`, except that a batch
    with a wrong early release flushes the pool at once (with the batches before it, in order):
    the violation and drift checks act on it while the same thresholds would keep releasing."""
    import numpy as np

    from apparate.core.controller import Config
    from apparate.serve.control import ControlOptions
    from apparate.serve.executor import BatchReport

    served = served_cnn(tiny_cnn)
    cfg = Config((0, 1), (0.3, 0.3))
    opts = ControlOptions(policy="apparate", initial=cfg, feedback_min_inputs=8)
    with serving(served, control_opts=opts) as live:
        ctl = live.engine.control

        def report(first_ok: bool) -> BatchReport:
            # the first input leaves at site 0 (right or wrong), the second runs to the end
            return BatchReport(cfg.sites, cfg.thresholds, cfg.version, np.array([[0.9, 0.9], [0.1, 0.1]]),
                               np.array([[first_ok, True], [True, True]]), np.array([0, 2]), np.array([first_ok, True]),
                               np.zeros(2), 2, None)

        assert ctl._pool_feedback(report(True)) == []  # 2 of 8 inputs: pooled
        assert ctl._pool_feedback(report(True)) == []
        (fb,) = ctl._pool_feedback(report(False))  # a wrong early answer: all 6 go now
        assert fb.batch_size == 6
        exit_idx, ok = fb.released()
        assert ok.tolist() == [True, True, True, True, False, True]
        assert ctl._pending == []
        for _ in range(3):  # right answers pool again until 8
            got = ctl._pool_feedback(report(True))
        assert got == []
        assert [f.batch_size for f in ctl._pool_feedback(report(True))] == [8]


def test_a_batch_reaches_the_controller_while_the_next_one_runs(tiny_cnn):
    """A batch's report is handed to the control thread as the next batch enters the model (not
    only once the engine is idle), and `flush` returns only after the last one was handled."""
    import threading

    import torch

    from apparate.serve.control import ControlOptions
    from apparate.serve.engine import Engine, EngineOptions
    from apparate.serve.scheduler import BatchingOptions

    served = served_cnn(tiny_cnn)
    slow = served.ee.backbone.slow  # each forward waits for `hold` (once) when one is set
    eng = Engine(served, EngineOptions(BatchingOptions("clockwork", 4), slo_ms=60_000, threads=1),
                 ControlOptions(policy="static", update_profile=False)).start()
    try:
        assert eng.flush()
        base = eng.control.handled
        imgs = [torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8) for _ in range(3)]
        first, second = threading.Event(), threading.Event()
        slow.hold = first
        a = eng.submit(imgs[:1])
        assert wait_for(lambda: slow.hold is None, 60)  # batch A is inside the model, held
        slow.hold = second
        b = eng.submit(imgs[1:])
        first.set()
        assert wait_for(lambda: slow.hold is None, 60)  # batch B is inside the model, held
        assert a[0].result(60).label >= 0 and not any(f.done() for f in b)
        assert wait_for(lambda: eng.control.handled == base + 1, 60)  # A's report, while B runs
        assert not second.is_set() and not any(f.done() for f in b)
        second.set()
        assert eng.flush()
        assert eng.control.handled == base + 2 and all(f.result(0).label >= 0 for f in b)
    finally:
        first.set()
        second.set()
        eng.stop()


def test_a_failing_engine_thread_still_hands_over_and_settles_everything(tiny_cnn):
    """If the engine thread itself fails, the queued inputs get 503 `engine failure`, the last
    batch's report still reaches the controller, and `flush` returns (every input settled)."""
    import threading

    import torch

    from apparate.serve.control import ControlOptions
    from apparate.serve.engine import Engine, EngineOptions
    from apparate.serve.requests import Rejected
    from apparate.serve.scheduler import BatchingOptions

    served = served_cnn(tiny_cnn)
    slow = served.ee.backbone.slow
    eng = Engine(served, EngineOptions(BatchingOptions("clockwork", 4), slo_ms=60_000, threads=1),
                 ControlOptions(policy="static", update_profile=False)).start()
    gate = threading.Event()
    try:
        assert eng.flush()
        base = eng.control.handled
        imgs = [torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8) for _ in range(3)]
        slow.hold = gate
        a = eng.submit(imgs[:1])
        assert wait_for(lambda: slow.hold is None, 60)  # batch A is inside the model

        def broken(*args, **kw):
            raise RuntimeError("the scheduler broke")

        eng.scheduler.decide = broken  # the engine thread fails at its next decision
        b = eng.submit(imgs[1:])
        gate.set()
        assert a[0].result(60).label >= 0
        assert all(f.result(60) == Rejected(503, "engine failure") for f in b)
        assert eng.flush(60)
        assert eng.control.handled == base + 1  # batch A's report was handed over
    finally:
        gate.set()
        eng.stop()
