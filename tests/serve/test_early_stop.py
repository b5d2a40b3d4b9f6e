"""Early stop in the live server (serve/early_stop.py), with real model passes on the tiny CNN:
released inputs leave their batch while work waits, the rest answer as in the full batch, a
batch whose inputs all left stops, an idle server completes every input, the feedback holds the
completed inputs weighted by their inverse sampling probability, and the engine serves every
request exactly once under a queue."""

from __future__ import annotations

import concurrent.futures
import time

import numpy as np
import pytest
import torch

from apparate.core.controller import Config
from apparate.serve.early_stop import EarlyStop
from apparate.serve.feedback import merged_feedback
from apparate.serve.requests import Answer, FinalTarget, Request

from .conftest import served_cnn, served_text


@pytest.fixture(scope="module")
def parts(tiny_cnn):
    from apparate.serve.executor import Executor

    served = served_cnn(tiny_cnn)
    released: list = []
    ex = Executor(served, lambda pairs: released.extend(pairs))
    assert ex.check_early_stop() is None  # the tiny CNN passes one tensor between blocks: rows can go
    yield served, ex, released
    ex.close()
    served.ee.remove_hooks()


def requests(n: int, seed: int = 0, finals: tuple[int, ...] = ()) -> list[Request]:
    g = torch.Generator().manual_seed(seed)
    reqs = [Request(torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=g), 1, time.perf_counter(), 1e18,
                    concurrent.futures.Future()) for _ in range(n)]
    for i in finals:
        reqs[i].final = concurrent.futures.Future()
    return reqs


def serve(ex, reqs, cfg, stop=None):
    with torch.inference_mode():
        return ex.run(reqs, cfg, time.perf_counter(), None, stop)


def answers(released, reqs) -> list[Answer]:
    got = {id(r): a for r, a in released if not isinstance(r, FinalTarget)}
    assert len(got) == len(reqs) == sum(not isinstance(r, FinalTarget) for r, _ in released)  # each exactly once
    return [got[id(r)] for r in reqs]


def half_exit_config(ex, reqs) -> Config:
    """Both sites; ramp 0's threshold at the median of its 1 - confidence on `reqs`: about half exit there."""
    x = ex.served.codec.encode([r.item for r in reqs])
    with torch.inference_mode():
        c = ex.ee(x, active=(0,)).ramps[0].conf
    return Config((0, 1), (float(np.median(1.0 - c)) + 1e-9, 0.0), 1)


def full_batch(ex, released) -> tuple[list[Request], Config, object, list[Answer]]:
    """12 inputs, a configuration that releases about half at ramp 0, and the batch served whole:
    (requests, config, report, answers); `released` is left empty."""
    reqs = requests(12, seed=1)
    cfg = half_exit_config(ex, reqs)
    released.clear()
    full = serve(ex, reqs, cfg)
    full_ans = answers(released, reqs)
    released.clear()
    return reqs, cfg, full, full_ans


def test_dropped_rows_leave_the_rest_with_the_full_batch_answers(parts):
    served, ex, released = parts
    reqs, cfg, full, full_ans = full_batch(ex, released)
    stop = EarlyStop(lambda: True, 0.25, np.random.default_rng(3))
    cut = serve(ex, reqs, cfg, stop)
    cut_ans = answers(released, reqs)
    early = np.array([a.early for a in full_ans])
    assert 0 < early.sum() < 12
    assert [a.early for a in cut_ans] == early.tolist()  # the same inputs exit at the same ramp
    coin = np.random.default_rng(3).random(int(early.sum())) >= 0.25  # who leaves, drawn as the rule draws
    assert cut.left == int(coin.sum()) > 0 and not cut.stopped
    left = np.flatnonzero(early)[coin]
    assert np.array_equal(np.flatnonzero(~cut.known), left)
    for a, b in zip(full_ans, cut_ans):  # every answer (early ones, and the rest's final ones) as in the full batch
        assert (a.label, a.exit_site) == (b.label, b.exit_site)
        assert a.confidence == pytest.approx(b.confidence, abs=1e-5)
    k = cut.known
    assert np.array_equal(cut.agree[k], full.agree[k]) and np.allclose(cut.conf[k], full.conf[k], atol=1e-5)
    kept_early = np.flatnonzero(early)[~coin]
    assert np.array_equal(np.flatnonzero(cut.weight == 4.0), kept_early) and np.all(np.delete(cut.weight, kept_early) == 1)
    fb = merged_feedback([cut])  # the rows that reached the end, each with its inverse sampling probability
    assert fb.batch_size == 12 - cut.left
    assert np.array_equal(fb.agree, full.agree[k]) and np.array_equal(fb.weight, cut.weight[k])
    assert cut.vanilla_ms is None  # fewer rows after the drop: its times do not update the profile
    assert all(s <= 0 for s in cut.site_ms) and all(s <= 0 for s in cut.ramp_ms)


def test_released_inputs_stay_where_too_little_of_the_pass_remains(parts):
    served, ex, released = parts
    reqs = requests(12, seed=1)
    cfg = half_exit_config(ex, reqs)
    released.clear()
    rep = serve(ex, reqs, cfg, EarlyStop(lambda: True, 0.25, np.random.default_rng(3), sites=frozenset({1})))
    early = np.array([a.early for a in answers(released, reqs)])
    assert 0 < early.sum() < 12  # inputs released at ramp 0, where leaving is not allowed here ...
    assert rep.left == 0 and rep.known is None and rep.weight is None  # ... all ran on, whole feedback
    assert rep.vanilla_ms is not None  # a full batch: its times still update the profile
    assert merged_feedback([rep]).batch_size == 12


def test_nothing_waiting_every_input_completes_with_weight_one(parts):
    served, ex, released = parts
    reqs = requests(8, seed=2)
    released.clear()
    rep = serve(ex, reqs, Config((0, 1), (1.0, 0.0), 1), EarlyStop(lambda: False, 0.05))
    assert all(a.early for a in answers(released, reqs))  # everything released at ramp 0 ...
    assert rep.known is None and rep.weight is None and rep.left == 0 and rep.feedback  # ... and ran to the end
    fb = merged_feedback([rep])
    assert fb.batch_size == 8 and fb.weight is None  # full feedback, every weight 1


def test_waiting_with_sample_one_in_k_weights_sampled_exits_by_k(parts):
    served, ex, released = parts
    k = 4
    reps, expect_known, expect_w = [], [], []
    rng_check = np.random.default_rng(11)
    stop = EarlyStop(lambda: True, 1 / k, np.random.default_rng(11))
    for seed in range(4):
        reqs = requests(8, seed=10 + seed)
        released.clear()
        reps.append(serve(ex, reqs, Config((0, 1), (1.0, 0.0), 1), stop))
        stays = rng_check.random(8) < 1 / k  # every input exits at ramp 0; the coin keeps these
        expect_known.append(stays)
        expect_w.append(np.full(int(stays.sum()), float(k)))
        answers(released, reqs)  # all answered, once
    for rep, stays in zip(reps, expect_known):
        assert rep.left == 8 - stays.sum() and rep.stopped == (not stays.any())
    fb = merged_feedback(reps)
    assert fb.batch_size == sum(int(s.sum()) for s in expect_known) > 0
    assert np.array_equal(fb.weight, np.concatenate(expect_w))


def test_a_batch_whose_inputs_all_left_stops_and_callers_of_finals_are_answered(parts, tiny_cnn):
    served, ex, released = parts
    calls = []
    head = served.ee.backbone.head.register_forward_hook(lambda *a: calls.append(1))
    try:
        reqs = requests(6, seed=5, finals=(2,))
        released.clear()
        rep = serve(ex, reqs, Config((0, 1), (1.0, 0.0), 1), EarlyStop(lambda: True, 1e-9))
        assert rep.left == 5 and not rep.stopped and calls == [1]  # the input whose caller wants the final stays
        finals = [a for r, a in released if isinstance(r, FinalTarget)]
        assert len(finals) == 1 and not finals[0].early and finals[0].exit_site == -1
        assert rep.known.tolist() == [False, False, True, False, False, False] and rep.weight is None
        calls.clear()
        reqs = requests(6, seed=6)
        released.clear()
        rep = serve(ex, reqs, Config((0, 1), (1.0, 0.0), 1), EarlyStop(lambda: True, 1e-9))
    finally:
        head.remove()
    assert rep.stopped and rep.left == 6 and calls == []  # the model's head never ran
    assert all(a.early and a.exit_site == 0 for a in answers(released, reqs))
    assert rep.known_count == 0 and not rep.feedback


def test_one_row_batches_and_one_row_left_leave_and_stop(parts):
    """A batch of one, and a batch cut down to one row before a later ramp releases it (the
    scorer answers one row with scalars): released, left, stopped, no ramp failure."""
    served, ex, released = parts
    failures = ex.ramp_failures
    reqs = requests(1, seed=8)
    released.clear()
    rep = serve(ex, reqs, Config((0, 1), (1.0, 0.0), 1), EarlyStop(lambda: True, 1e-9))
    assert rep.stopped and rep.left == 1 and answers(released, reqs)[0].exit_site == 0
    reqs = requests(6, seed=9)
    x = ex.served.codec.encode([r.item for r in reqs])
    with torch.inference_mode():
        c0 = np.asarray(ex.ee(x, active=(0,)).ramps[0].conf)
    t0 = float(np.sort(1.0 - c0)[-1]) - 1e-12  # every row but the least confident leaves at ramp 0
    released.clear()
    rep = serve(ex, reqs, Config((0, 1), (t0, 1.0), 1), EarlyStop(lambda: True, 1e-9))
    assert rep.stopped and rep.left == 6 and ex.ramp_failures == failures
    assert [a.exit_site for a in answers(released, reqs)].count(1) == 1


def test_the_learned_rule_and_a_model_that_cannot_drop_keep_every_input(parts, tiny_text):
    from apparate.core.evidence import F, Scorer
    from apparate.serve.executor import Executor

    served, ex, released = parts
    reqs = requests(4, seed=7)
    released.clear()
    scorer = Scorer(0, np.full((served.num_sites, F), np.nan))
    with torch.inference_mode():
        rep = ex.run(reqs, Config((0, 1), (1.0, 0.0), 1), time.perf_counter(), scorer, EarlyStop(lambda: True, 1e-9))
    ex.reset_stream()
    assert rep.left == 0 and rep.known is None
    text = served_text(tiny_text)  # a masked mean in its own forward, after the sites: rows cannot be cut
    tex = Executor(text, lambda pairs: None)
    try:
        assert tex.check_early_stop() is not None
        with torch.inference_mode():
            items = ["good film", "bad", "a warm and witty film that never gets dull"]
            out = tex.run([Request(t, 1, time.perf_counter(), 1e18, concurrent.futures.Future()) for t in items],
                          Config((0, 1), (1.0, 0.0), 1), time.perf_counter(), None, EarlyStop(lambda: True, 1e-9))
        assert out.left == 0 and out.known is None
    finally:
        tex.close()
        text.ee.remove_hooks()


def test_engine_with_early_stop_serves_every_request_once_under_a_queue(tiny_cnn):
    from apparate.serve.control import ControlOptions
    from apparate.serve.engine import Engine, EngineOptions
    from apparate.serve.scheduler import BatchingOptions

    served = served_cnn(tiny_cnn)
    eng = Engine(served, EngineOptions(BatchingOptions("clockwork", 8, shed=False), slo_ms=1e6, threads=1,
                                       early_stop=True, stop_sample=0.25),
                 ControlOptions(policy="static", initial=Config((0, 1), (1.0, 0.0))))
    try:
        assert eng.describe()["early_stop"]["on"]
        # queued before the engine starts: every batch but the last finds work waiting
        futs = eng.submit([np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8) for i in range(64)])
        eng.start()
        assert eng.flush(60)
        res = [f.result(timeout=60) for f in futs]
    finally:
        eng.stop()
        eng.executor.close()
        served.ee.remove_hooks()
    assert all(isinstance(r, Answer) and r.early for r in res) and len(res) == 64
    stats = eng.describe()
    assert eng._settled == 64 and not stats["errors"]  # each answered once (a second answer would fail the engine)
    exits = sum(s.value for m in eng.metrics.exits.collect() for s in m.samples if s.name.endswith("_total"))
    assert exits == 64
    assert stats["early_stop"]["rows_left"] > 0 and stats["total"]["inputs"] == 64 - stats["early_stop"]["rows_left"]
    assert eng.metrics.stop_rows._value.get() == stats["early_stop"]["rows_left"]


def test_a_wrong_sampled_answer_sends_every_exit_to_the_end_for_a_while(parts):
    # The live rule's share is core.sampling's, updated after each batch: a batch whose sampled
    # early answers include a wrong one raises it to 1 (every released input runs on, weight 1)
    # for `alarm` inputs, then it falls back to the floor.
    served, ex, released = parts
    stop = EarlyStop(lambda: True, 1.0 / 2, np.random.default_rng(5), alarm=16)
    shares, alarms = [], []
    for seed in range(12):
        reqs = requests(8, seed=40 + seed)
        released.clear()
        share = stop.sample
        shares.append(share)
        rep = serve(ex, reqs, Config((0, 1), (0.0, 1.0), 1), stop)  # every input exits at ramp 1
        answers(released, reqs)
        w = np.ones(8) if rep.weight is None else rep.weight
        known = np.ones(8, dtype=bool) if rep.known is None else rep.known
        sampled = (w > 1.0) & known
        assert np.all(w[sampled] == 1.0 / share)  # the share of this batch's coins
        if share == 1.0:
            assert rep.left == 0 and not sampled.any()  # during an alarm every input runs on
        before = stop.sampler.alarms["wrong"]
        stop.after(rep)
        alarms.append(stop.sampler.alarms["wrong"] > before)
        assert alarms[-1] == bool((sampled & ~rep.released_agree).any())
    assert any(alarms)  # ramp 1 of the tiny model disagrees with its head often enough
    first = alarms.index(True)
    assert shares[first + 1:first + 3] == [1.0, 1.0]  # 16 inputs: two batches of 8
    assert 0.5 in shares[first + 3:]  # then back to the floor


def test_inputs_that_leave_join_the_pool_and_run_again_with_the_full_batch_answers(parts):
    from apparate.core.sampling import FeedbackPool

    served, ex, released = parts
    reqs, cfg, full, _ = full_batch(ex, released)
    pool = FeedbackPool(cap=2, max_age=100)
    stop = EarlyStop(lambda: True, 0.25, np.random.default_rng(3), pool=pool)
    cut = serve(ex, reqs, cfg, stop)
    cut_ans = answers(released, reqs)
    early = np.flatnonzero([a.early for a in cut_ans])
    coin = np.random.default_rng(3).random(early.size) >= 0.25  # who leaves, drawn as the rule draws
    left = early[coin]
    assert cut.left == left.size > 2 and len(pool) == 2
    entries = pool.take(2)
    assert [e[1][0] for e in entries] == [reqs[i] for i in left[:2]]  # the first two that left
    assert all(e[1][1] is cfg and e[1][2] == 0 for e in entries)  # released at ramp 0 of this config
    kept = early[~coin]
    before = np.cumsum(coin) - coin
    assert np.array_equal(cut.weight[kept], np.where(before[~coin] < 2, 1.0, 4.0))  # 1 while the pool had room
    # run again: the ramps' and the final answers of the full batch, nothing released again
    released.clear()
    with torch.inference_mode():
        late = ex.rerun([reqs[i] for i in left[:2]], np.zeros(2, dtype=np.int64), cfg, lambda: False)
        gone = ex.rerun([reqs[i] for i in left[:2]], np.zeros(2, dtype=np.int64), cfg, lambda: True)
    assert not released and gone is None  # abandoned at the first ramp: work is waiting
    assert late.late and late.known is None and late.weight is None
    assert np.array_equal(late.agree, full.agree[left[:2]]) and np.allclose(late.conf, full.conf[left[:2]], atol=1e-5)
    assert np.array_equal(late.released_agree, full.agree[left[:2], 0])
    fb = merged_feedback([late])
    assert fb.batch_size == 2 and fb.weight is None


def test_an_engine_with_a_feedback_pool_runs_every_pooled_input_again_when_idle(tiny_cnn):
    from apparate.core.settings import Settings
    from apparate.serve.control import ControlOptions
    from apparate.serve.engine import Engine, EngineOptions
    from apparate.serve.scheduler import BatchingOptions

    from .conftest import wait_for

    served = served_cnn(tiny_cnn)
    settings = Settings.for_kind(served.kind).replace(stop_pool=64, stop_min_rest=0.0)
    eng = Engine(served, EngineOptions(BatchingOptions("clockwork", 8, shed=False), slo_ms=1e6, threads=1,
                                       early_stop=True, stop_sample=0.25),
                 ControlOptions(policy="static", initial=Config((0, 1), (1.0, 0.0)), settings=settings))
    try:
        futs = eng.submit([np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8) for i in range(64)])
        eng.start()  # queued before it starts: every batch but the last finds work waiting
        res = [f.result(timeout=60) for f in futs]
        pool = eng.early_stop.pool
        assert wait_for(lambda: len(pool) == 0 and eng.control.handled > 0, timeout=60)
        assert eng.flush(60)
        eng.control.flush(60)
        stats = eng.describe()
    finally:
        eng.stop()
        eng.executor.close()
        served.ee.remove_hooks()
    assert all(isinstance(r, Answer) and r.early for r in res) and len(res) == 64
    left = stats["early_stop"]["rows_left"]
    assert left > 0 and pool.counts["joined"] == pool.counts["idle"] == left  # each ran again, once, while idle
    assert stats["early_stop"]["pool"]["joined"] == left and stats["early_stop"]["rows_rerun"] == left
    assert stats["total"]["inputs"] == 64 - left and not stats["errors"]  # re-runs answer no one again


def test_a_pooled_input_whose_run_fails_is_dropped_not_retried(parts):
    from apparate.core.sampling import FeedbackPool

    served, ex, released = parts
    released.clear()
    good = requests(1, seed=5)[0]
    bad = Request("not an image", 1, time.perf_counter(), 1e18, concurrent.futures.Future())
    cfg = Config((0, 1), (1.0, 0.0), 1)
    stop = EarlyStop(lambda: False, 0.25, pool=FeedbackPool(cap=4, max_age=100))
    stop.pool.add([(bad, cfg, 0), (good, cfg, 0)])
    got: list = []
    with torch.inference_mode():
        assert stop.run_pool(ex, False, got.append)  # the bad one: its run raises
        assert len(stop.pool) == 1 and stop.pool.counts["failed"] == 1 and not got
        assert stop.run_pool(ex, False, got.append)  # the next one runs
        assert not stop.run_pool(ex, False, got.append)  # nothing left
    assert stop.pool.counts["idle"] == 1 and len(got) == 1 and got[0].late and not released


def test_a_server_refuses_the_replays_resuming_pool(tiny_cnn):
    from apparate.core.settings import Settings
    from apparate.serve.control import ControlOptions
    from apparate.serve.engine import Engine, EngineOptions

    served = served_cnn(tiny_cnn)
    settings = Settings.for_kind(served.kind).replace(stop_pool=8, stop_pool_resume=True)
    try:
        with pytest.raises(ValueError, match="for the replay only"):
            Engine(served, EngineOptions(slo_ms=1e6, threads=1, early_stop=True), ControlOptions(settings=settings))
    finally:
        served.ee.remove_hooks()


def test_a_pooled_input_waits_while_work_waits_and_runs_regardless_once_overdue(parts):
    from apparate.core.sampling import FeedbackPool

    served, ex, released = parts
    released.clear()
    cfg = Config((0, 1), (1.0, 0.0), 1)
    stop = EarlyStop(lambda: True, 0.25, pool=FeedbackPool(cap=4, max_age=8))  # work is always waiting
    stop.pool.add([(requests(1, seed=6)[0], cfg, 0)])
    got: list = []
    with torch.inference_mode():
        assert not stop.run_pool(ex, True, got.append)  # queued, not overdue: the batch goes first
        assert stop.run_pool(ex, False, got.append)  # the queue looks empty, but a request waits at ramp 0
        assert len(stop.pool) == 1 and stop.pool.counts["abandoned"] == 1 and not got
        stop.after(None, served=8)  # 8 inputs served since it joined: overdue
        assert stop.run_pool(ex, True, got.append)  # runs though work waits, to the end
    assert len(stop.pool) == 0 and stop.pool.counts["forced"] == 1 and len(got) == 1 and got[0].late
    assert not released
