"""The learned exit rule (core/evidence.py, policies/evidence.py): features, fitting, the bounded
buffer, updating after a change in the stream, re-scoring the window, deterministic replay."""

import numpy as np
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from apparate.core.evidence import (F, EvidenceModel, Scorer, StreamContext, features, features_one, fit_logistic,
                                    movement, movement_one)
from apparate.core.profile import LatencyProfile
from apparate.core.settings import Settings
from apparate.core.synthetic import synthetic_camera, synthetic_recording
from apparate.core.batchers import ClockworkBatcher
from apparate.policies import PolicyInputs, make_policy
from apparate.policies.catalog import RampFamily
from apparate.replay.simulator import replay

S = 6
PROFILE = LatencyProfile.linear(S, ramp_fraction=0.003)


def auc(score, y):
    """Probability that an agreeing input scores above a disagreeing one (ties count half)."""
    pos, neg = score[y], score[~y]
    if not pos.size or not neg.size:
        return float("nan")
    return float(((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()))


def test_features_use_the_latest_final_and_the_previous_input():
    ctx = StreamContext.empty(3)
    ctx.last_final = 1
    ctx.prev_pred[:] = [1, 0, -1]
    ctx.prev_conf[:] = [0.9, 0.6, np.nan]
    sites = np.array([0, 1])
    conf = np.array([[0.8, 0.6], [0.8, 0.9]])
    pred = np.array([[1, 1], [1, 0]])
    X = features(conf, pred, sites, ctx)
    assert X.shape == (2, 2, F)
    assert X[:, :, 2].tolist() == [[1, 1], [1, 0]]  # repeats the latest final answer (1)
    assert X[:, :, 3].tolist() == [[1, 0], [1, 0]]  # same answer as the input before, at that site
    assert X[0, :, 4] == pytest.approx([0.9, 1.0])  # 1 - |conf change|
    assert X[1, :, 4] == pytest.approx([1.0, 0.7])
    assert np.all(X[..., 5] == 0)  # no movement recorded: read as a 100% change, log(1) = 0
    Xm = features(conf, pred, sites, ctx, move=np.array([[0.01, np.nan], [0.5, 0.0]]), last_final=np.array([0, 1]))
    assert Xm[:, :, 2].tolist() == [[0, 0], [1, 0]]  # each input's own latest final answer
    assert Xm[0, 0, 5] == pytest.approx(np.log(0.011)) and Xm[0, 1, 5] == pytest.approx(np.log(1.001))
    assert Xm[1, 0, 8] == pytest.approx(np.log(0.501)) and Xm[0, 0, 8] == 0  # repeat * lmove
    ctx.advance(sites, conf, pred, np.array([0, 0]))
    assert ctx.last_final == 0 and ctx.prev_pred.tolist() == [1, 0, -1]


@given(st.integers(0, 10**6), st.booleans(), st.booleans(), st.booleans())
def test_one_input_in_plain_floats_scores_as_the_batch_rule(seed, known_prev, moved, fitted):
    """The batch-of-one path a server's hook takes (`features_one`, `movement_one`,
    `Scorer.score_one`) gives the batch functions' features and score bit for bit (the replay
    scores recordings with the batch ones)."""
    rng = np.random.default_rng(seed)
    S, D, site = 6, 12, int(rng.integers(0, 6))
    ctx = StreamContext.empty(S)
    ctx.last_final = int(rng.integers(-1, 3))
    if known_prev:
        ctx.prev_pred[site] = int(rng.integers(0, 3))
        ctx.prev_conf[site] = float(rng.random())
    conf = float(rng.choice([rng.random(), 0.0, 1.0, 1e-6, 1 - 1e-6]))
    pred = int(rng.integers(0, 3))
    f = rng.normal(size=(1, D)).astype(np.float32)
    prev = rng.normal(size=(1, D)).astype(np.float32) * float(rng.choice([1.0, 0.0, 1e-3]))
    mv = movement(f, prev if moved else None).astype(np.float32)  # as the executor computes it
    m1 = movement_one(f[0], prev[0] if moved else None)
    assert (np.isnan(mv[0]) and np.isnan(m1)) or mv[0] == m1  # bit for bit: recordings use `movement`
    X = features(np.array([[conf]]), np.array([[pred]]), np.array([site]), ctx, mv.reshape(1, 1))
    x1 = features_one(conf, pred, ctx.last_final, int(ctx.prev_pred[site]), float(ctx.prev_conf[site]), float(mv[0]))
    assert np.array_equal(np.array(x1), X[0, 0])  # bit for bit: a server decides as its replay
    w = rng.normal(scale=float(rng.choice([0.1, 3.0, 30.0])), size=(S, F))
    if not fitted:
        w[site] = np.nan
    sc = Scorer(1, w)
    assert sc.score_one(x1, site, conf) == sc.score(X, np.array([site]), np.array([[conf]]))[0, 0]



def test_logistic_fit_separates_and_stays_finite():
    rng = np.random.default_rng(0)
    x = rng.normal(size=2000)
    y = (rng.uniform(size=2000) < 1 / (1 + np.exp(-3 * x))).astype(float)
    X = np.c_[np.ones(2000), x]
    w = fit_logistic(X, y, l2=0.1)
    assert w[1] == pytest.approx(3.0, abs=0.5)
    w_sep = fit_logistic(X, (x > 0).astype(float), l2=1.0)  # perfectly separable
    assert np.all(np.isfinite(w_sep)) and w_sep[1] > 0


def _objective(X, y, w, l2):
    reg = np.full(X.shape[1], l2)
    reg[0] = 1e-6
    z = X @ w
    return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * np.sum(reg * w * w))


@hsettings(max_examples=40, deadline=None)
@given(st.integers(0, 10**6), st.floats(-1e9, 1e9), st.floats(0.05, 2.0), st.sampled_from([20, 200, 1000]))
def test_a_warm_start_anywhere_reaches_the_same_fit(seed, scale, l2, n):
    # A previous fit on other inputs can saturate the sigmoid on these: plain Newton steps from
    # there once ran off to a bias of 1e9 (every score 0 or 1). From any start, the fit is the
    # optimum a cold start finds, never a worse objective.
    rng = np.random.default_rng(seed)
    X = np.c_[np.ones(n), rng.normal(size=(n, 3)), (rng.uniform(size=n) < 0.5).astype(float)]
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-(X @ rng.normal(size=5))))).astype(float)
    start = rng.normal(size=5) * scale
    cold = fit_logistic(X, y, l2, iters=50)
    warm = fit_logistic(X, y, l2, iters=50, start=start)
    assert np.all(np.isfinite(warm)) and np.abs(warm).max() < 1e4
    assert _objective(X, y, warm, l2) <= _objective(X, y, cold, l2) + 1e-6 * max(1.0, n)
    assert np.allclose(warm, cold, atol=1e-3)


@hsettings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=40), st.integers(4, 64), st.integers(0, 1000))
def test_buffer_stays_within_its_bound_and_scores_are_probabilities(sizes, size, seed):
    rng = np.random.default_rng(seed)
    m = EvidenceModel(S, size, min_inputs=4, train_inputs=32, refit_every=8)
    ctx = StreamContext.empty(S)
    for n in sizes:
        sites = np.sort(rng.choice(S, size=rng.integers(1, S + 1), replace=False))
        conf = rng.uniform(0, 1, (n, sites.size))
        pred = rng.integers(0, 3, (n, sites.size))
        X = features(conf, pred, sites, ctx)
        score = m.score(X, sites, conf)
        assert score.shape == conf.shape and np.all((score >= 0) & (score <= 1))
        m.add(sites, X, rng.uniform(size=(n, sites.size)) < 0.7)
        ctx.advance(sites, conf, pred, rng.integers(0, 3, n))
        if m.due():
            m.refit()
        assert m.X.shape == (size, S, F) and m.agree.shape == (size, S)
    assert m.written == sum(sizes)
    # the ring holds exactly the latest min(written, size) inputs
    assert np.count_nonzero(~np.isnan(m.X[:, :, 0]).all(axis=1)) == min(m.written, size)


def test_the_predictor_is_updated_after_the_stream_changes():
    """Independent inputs whose confidence tells agreement, then a camera whose answer repeats and
    whose confidence tells nothing: after refits on the new phase the learned score separates
    agreeing from disagreeing inputs; the fit of the first phase does not."""
    first = synthetic_recording(1200, S, seed=3, classes=2)
    second = synthetic_camera(1600, S, seed=4, informative=0.4)
    m = EvidenceModel(S, 1024, min_inputs=128, train_inputs=1024, refit_every=128)
    ctx = StreamContext.empty(S)
    sites = np.arange(S)
    held = {}

    def serve(rec, tag):
        for a in range(0, rec.num_inputs, 4):
            sl = slice(a, a + 4)
            conf, pred = rec.conf[sl].astype(float), rec.pred[sl].astype(np.int64)
            X = features(conf, pred, sites, ctx)
            m.add(sites, X, rec.agree[sl])
            ctx.advance(sites, conf, pred, rec.final[sl])
            if m.due():
                m.refit()
            if a == rec.num_inputs - 400:
                held[tag] = m.weights.copy()

    serve(first, "first")
    # the second phase's latest 400 inputs, scored by the first phase's fit and by the refitted one
    ctx2 = StreamContext.empty(S)
    tail = slice(second.num_inputs - 400, None)
    X2 = features(second.conf[:, sites].astype(float), second.pred.astype(np.int64), sites, ctx2,
                  last_final=np.r_[-1, second.final[:-1]])
    before = m.score(X2[tail], sites, second.conf[tail].astype(float))
    serve(second, "second")
    after = m.score(X2[tail], sites, second.conf[tail].astype(float))
    ag = second.agree[tail]
    a_before = np.nanmean([auc(before[:, j], ag[:, j]) for j in range(S)])
    a_after = np.nanmean([auc(after[:, j], ag[:, j]) for j in range(S)])
    assert a_after > 0.9 > a_before
    # and it says so in its weights: the answer repeating the latest final answer counts now
    assert np.all(m.weights[:, 2] > held["first"][:, 2] + 1.0)


def _camera_inputs(seed=0):
    boot = synthetic_camera(300, S, seed=seed + 100, informative=0.5)
    ev = synthetic_camera(3000, S, seed=seed, informative=0.5)
    settings = Settings(window_inputs=512, recent_inputs=256, min_tune_inputs=64, evidence_min_inputs=128,
                        evidence_refit_inputs=128)
    return PolicyInputs(RampFamily(boot, ev, PROFILE), settings)


def test_learned_rule_releases_what_confidence_cannot_on_an_ordered_stream():
    inputs = _camera_inputs()
    t = np.arange(inputs.light.evaluation.num_inputs) / 30.0
    runs = {}
    for name in ("apparate", "apparate-learned"):
        runs[name] = replay(inputs.light.evaluation, t, PROFILE, make_policy(name, inputs), ClockworkBatcher(8), 1000)
    early = {k: float((r.exit_site >= 0).mean()) for k, r in runs.items()}
    acc = {k: float(r.correct.mean()) for k, r in runs.items()}
    assert early["apparate-learned"] > early["apparate"] + 0.2, early
    assert acc["apparate-learned"] >= 0.99, acc


@pytest.mark.parametrize("movement", [True, False])
def test_the_movement_feature_can_be_turned_off(movement):
    """`evidence_movement` off: the learned rule's movement feature (and its products) read 0
    whatever the recording's movement, in the bootstrap's rows as in served batches."""
    import dataclasses

    from apparate.core.evidence import FEATURES

    inputs = _camera_inputs()
    rng = np.random.default_rng(3)
    ev = inputs.light.evaluation
    moved = dataclasses.replace(ev, move=rng.random(ev.conf.shape).astype(np.float32))
    boot = dataclasses.replace(inputs.light.bootstrap, move=rng.random(inputs.light.bootstrap.conf.shape).astype(np.float32))
    settings = inputs.settings.replace(evidence_movement=movement)
    pol = make_policy("apparate-learned", PolicyInputs(RampFamily(boot, moved, PROFILE), settings))
    pol.plan(moved.conf[:8], moved.agree[:8], pred=moved.pred[:8], move=moved.move[:8])
    X = pol._pending[0]
    cols = [FEATURES.index(f) for f in ("lmove", "repeat*lmove")]
    seeded = pol.model.X[:pol.model.written]
    if movement:
        assert np.any(X[..., cols[0]] != 0) and np.any(np.nan_to_num(seeded[..., cols[0]]) != 0)
    else:
        assert np.all(X[..., cols] == 0) and np.all(np.nan_to_num(seeded[..., cols]) == 0)


def test_window_and_buffer_stay_aligned_and_replay_repeats_its_decisions():
    inputs = _camera_inputs(seed=5)
    rec = inputs.light.evaluation
    t = np.cumsum(np.random.default_rng(1).exponential(1 / 60.0, rec.num_inputs))
    out = []
    for _ in range(2):
        pol = make_policy("apparate-learned", inputs)
        run = replay(rec, t, PROFILE, pol, ClockworkBatcher(8), 1000)
        assert pol.model.written == pol.controller.window.written
        assert pol.model.version >= 2  # refitted while serving
        # the window holds the current fit's scores: re-scoring it changes nothing
        win = pol.controller.window
        rows = win.last(win.size)
        again = pol.model.rescored(rows, win.conf[rows])
        ran = ~np.isnan(win.conf[rows])
        fitted = ~np.isnan(pol.model.weights[:, 0])
        cmp = ran & fitted[None, :] & (pol.model.X[rows, :, 0] == 1)
        assert np.allclose(again[cmp], win.conf[rows][cmp])
        out.append((run.exit_site, run.release, run.batch_version, [e.detail for e in pol.controller.events]))
    for a, b in zip(out[0], out[1]):
        if isinstance(a, np.ndarray):
            assert np.array_equal(a, b, equal_nan=True)
        else:
            assert a == b


@hsettings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 300), st.floats(0.0, 0.2))
def test_release_share_keeps_the_loss_and_whole_tie_groups(seed, n, loss):
    from apparate.core.evidence import release_share

    rng = np.random.default_rng(seed)
    score = rng.integers(0, 8, n) / 8.0  # many ties
    ok = rng.uniform(size=n) < 0.8
    share = release_share(score, ok, loss)
    k = int(round(share * n))
    order = np.argsort(-score, kind="stable")
    assert np.count_nonzero(~ok[order[:k]]) <= loss * n + 1e-9
    if 0 < k < n:  # a threshold releases a whole group of tied scores or none of it
        assert score[order[k - 1]] != score[order[k]]
    assert release_share(score, ok, min(loss * 2, 1.0)) >= share
