"""`apparate-learned` served live: the executor scores with the control thread's published fit and
decides as the replay's `LearnedPolicy.plan` does; served batches' features reach the policy's
buffer, aligned with the controller's window; refits publish a new scorer."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from .conftest import image_request, served_cnn, serving, wait_for
from .test_control import small_settings


def _frames(seed: int, n: int) -> np.ndarray:
    """An ordered stream of n 8x8 frames: a few scenes, each held for a while with a little noise
    (so answers repeat and pooled features barely move inside a scene)."""
    rng = np.random.default_rng(seed)
    scenes = rng.integers(0, 256, (4, 8, 8, 3))
    which = np.repeat(np.arange(n) // 7 % 4, 1)
    noise = rng.integers(-6, 7, (n, 8, 8, 3))
    return np.clip(scenes[which] + noise, 0, 255).astype(np.uint8)


def _pooled_seen(served) -> list:
    """Per ramp result, its pooled features or the difference detector's sums (None where the hook
    computed neither), as the model runs."""
    seen: list = []
    ee_call = served.ee.forward

    def spy(*a, **kw):
        out = ee_call(*a, **kw)
        seen.extend(r.sums if r.pooled is None else r.pooled for r in out.ramps.values())
        return out

    served.ee.forward = spy
    return seen


def test_the_executor_decides_as_the_replay_policy(tiny_cnn):
    """Same inputs, same fit: the executor's features, scores and exit positions equal what
    `LearnedPolicy.plan` computes from the ramps' confidences, answers and the recording
    instrument's feature movement (`bench.record._MoveTracker`), batch after batch."""
    import torch

    from apparate.bench.record import _MoveTracker
    from apparate.core.controller import Config, Controller
    from apparate.core.evidence import F
    from apparate.policies.evidence import LearnedPolicy
    from apparate.serve.executor import Executor
    from apparate.serve.requests import Request

    served = served_cnn(tiny_cnn)
    S = served.num_sites
    settings = small_settings(evidence_min_inputs=10 ** 6, evidence_refit_inputs=10 ** 6)
    cfg = Config((0, 1), (0.9, 0.98), 3)
    pol = LearnedPolicy("apparate-learned", Controller(served.profile, settings, cfg), None, seed_window=False)
    # fits that use every feature (scores 0.01..0.6 on these frames: thresholds that release some)
    pol.model.weights[0] = np.random.default_rng(1).normal(0, 0.6, F)
    pol.model.weights[1] = np.random.default_rng(2).normal(0, 0.6, F)
    pol.model.version = 1
    scorer = pol.scorer()
    assert scorer.version == 1 and not scorer.weights.flags.writeable

    released = []
    ex = Executor(served, released.extend)
    ref = served_cnn(tiny_cnn).ee  # a second copy of the model, instrumented as recording does
    tracker = _MoveTracker(ref)
    frames = _frames(0, 40)
    exits, early = [], 0
    a = 0
    try:
        for k in (1, 3, 5, 2, 8, 1, 4, 7, 6, 3):
            imgs = frames[a:a + k]
            a += k
            reqs = [Request(img, 1, 0.0, 0.0) for img in imgs]
            with torch.inference_mode():
                rep = ex.run(reqs, cfg, ex.clock(), scorer)
                tracker.start()
                out = ref(served.codec.encode(list(imgs)), active=range(S))
                move = tracker.finish()
            conf, pred = out.conf_matrix(range(S)), out.pred_matrix(range(S))
            final = out.final_pred.numpy()
            agree = pred == final[:, None]
            plan = pol.plan(conf, agree, pred=pred, move=move)
            X, score, _ = pol._pending
            assert rep.features.shape == (k, 2, F) and rep.scorer_version == 1
            assert np.array_equal(rep.ramp_conf, conf) and np.array_equal(rep.agree, agree)
            assert np.array_equal(rep.features, X)
            assert np.array_equal(rep.conf, score)  # the controller sees these scores
            assert np.array_equal(rep.exit_pos, plan.exit_pos)
            exits.append(plan.exit_pos)
            early += int(np.count_nonzero(plan.exit_pos < 2))
            # the replay policy's stream context moves on as its observe would
            pol._pending = None
            pol.ctx.advance(np.arange(S), conf, pred, final)
        assert len(released) == a
        assert np.all(np.isfinite(X[1:, :, 5]))  # movement known inside a batch (and across batches)
    finally:
        tracker.close()
        ex.close()
    allpos = np.concatenate(exits)
    assert 0 < early < a and {0, 1, 2} <= set(allpos.tolist()), allpos  # every way out was taken


def test_without_a_scorer_nothing_learned_runs(tiny_cnn):
    """The confidence rule's path: no pooled features, no features in the report."""
    import torch

    from apparate.core.controller import Config
    from apparate.serve.executor import Executor
    from apparate.serve.requests import Request

    served = served_cnn(tiny_cnn)
    ex = Executor(served, lambda pairs: None)
    seen = _pooled_seen(served)
    with torch.inference_mode():
        rep = ex.run([Request(img, 1, 0.0, 0.0) for img in _frames(1, 4)], Config((0, 1), (0.3, 0.3)), ex.clock())
    ex.close()
    assert rep.features is None and rep.scorer_version is None and rep.ramp_conf is None
    assert seen and all(p is None for p in seen)


@pytest.mark.parametrize("n", [1, 4])
def test_without_movement_the_hook_skips_the_pooled_features(tiny_cnn, n):
    """`evidence_movement` off (the executor's `movement`): the learned rule still scores every
    ramp, but no site's pooled features are computed and the movement feature reads 0, at batch
    1 (the plain-float path) as at larger batches."""
    import torch

    from apparate.core.controller import Config
    from apparate.core.evidence import F, FEATURES, Scorer
    from apparate.serve.executor import Executor
    from apparate.serve.requests import Request

    served = served_cnn(tiny_cnn)
    seen = _pooled_seen(served)
    scorer = Scorer(1, np.random.default_rng(0).normal(0, 0.5, (served.num_sites, F)))
    reps = {}
    for movement in (True, False):
        ex = Executor(served, lambda pairs: None, movement=movement)
        seen.clear()
        with torch.inference_mode():
            for k in range(2):  # the second batch has a previous input to move from
                reqs = [Request(img, 1, 0.0, 0.0) for img in _frames(k, n)]
                reps[movement] = ex.run(reqs, Config((0, 1), (0.01, 0.01)), ex.clock(), scorer)
        ex.close()
        assert reps[movement].features is not None
        assert (seen and all(p is None for p in seen)) == (not movement)
    lmove = FEATURES.index("lmove")
    assert np.all(reps[False].features[..., lmove] == 0) and np.any(reps[True].features[..., lmove] != 0)


def test_serving_apparate_learned(tiny_cnn):
    """A live server with `--policy apparate-learned` answers OIP v2 requests; after enough of
    them the evidence model has refitted and the engine scores with the published fit; the
    buffer and the controller's window stay level."""
    from apparate.core.controller import Config
    from apparate.policies.evidence import LearnedPolicy
    from apparate.serve.control import ControlOptions

    served = served_cnn(tiny_cnn)
    settings = small_settings(evidence_min_inputs=24, evidence_refit_inputs=24, evidence_train_inputs=96,
                              evidence_guard=None)  # the refit-and-publish path, whatever the guard says
    # batches pooled into controller batches of at least 6 inputs: features concatenated alike
    control = ControlOptions(policy="apparate-learned", settings=settings, initial=Config((0, 1), (0.3, 0.3)),
                             feedback_min_inputs=6)
    frames = _frames(2, 160)
    from apparate.serve.engine import EngineOptions

    # a generous SLO: this test is about learning, and a loaded machine must not make a request "late"
    with serving(served, EngineOptions(slo_ms=60_000, threads=1), control) as live, \
            httpx.Client(base_url=live.url, timeout=120) as c:
        ctl = live.engine.control
        pol = ctl.policy
        assert isinstance(pol, LearnedPolicy) and live.engine.live.scorer is pol.scorer()
        assert pol.model.written == pol.controller.window.written == 0
        v0 = pol.model.version
        for i in range(0, len(frames), 4):
            body = {"inputs": [{"name": "input", "shape": [4, 8, 8, 3], "datatype": "UINT8",
                                "data": frames[i:i + 4].reshape(-1).tolist()}]}
            r = c.post("/v2/models/tiny/infer", json=body)
            assert r.status_code == 200, r.text
            out = {o["name"]: o for o in r.json()["outputs"]}
            assert len(out["label"]["data"]) == 4 and set(out["exit_site"]["data"]) <= {-1, 0, 1}
        assert live.engine.flush()
        # level: every pooled feedback went to both (a partial pool is dropped at a config change)
        assert pol.model.written == pol.controller.window.written > len(frames) // 2
        assert pol.model.version >= max(v0, 1)  # refitted on served inputs
        assert wait_for(lambda: live.engine.live.scorer.version == pol.model.version)
        assert live.engine.live.scorer is pol.scorer()  # the engine scores with the current fit
        st = c.get("/v2/models/tiny/earlyexit").json()
        assert st["policy"] == "apparate-learned" and st["scorer_version"] == pol.model.version
        ev = st["control"]["evidence"]  # (statistics refresh at most every 0.2 s, on feedback)
        assert set(ev) == {"version", "published", "buffered", "fitted_sites"} and 0 < ev["buffered"] <= len(frames)
        # a single input is served too (the batch-of-one path)
        r = c.post("/v2/models/tiny/infer", json=image_request(1, seed=5))
        assert r.status_code == 200 and r.json()["outputs"][0]["data"]


def test_pooled_feedback_keeps_features_in_order_and_rescored_with_the_current_fit(tiny_cnn):
    """`_merged` concatenates pooled batches' features, scores, exits and scorer versions in
    arrival order; inputs a stale scorer served are re-scored with the current fit before they
    reach the window; the buffer stays level with the window (also with no active ramp)."""
    from apparate.core.controller import Config, Controller
    from apparate.core.evidence import F, EvidenceFeedback
    from apparate.policies.evidence import LearnedPolicy
    from apparate.serve.feedback import merged_feedback as _merged
    from apparate.serve.executor import BatchReport

    prof = tiny_cnn.bundle.profile
    settings = small_settings(evidence_min_inputs=10 ** 6, evidence_refit_inputs=10 ** 6)
    cfg = Config((0, 1), (0.2, 0.2))
    pol = LearnedPolicy("apparate-learned", Controller(prof, settings, cfg), None, seed_window=False)
    pol.model.weights[:] = np.random.default_rng(0).normal(0, 0.5, (2, F))
    pol.model.version = 2
    rng = np.random.default_rng(1)

    def report(n, version):
        X = rng.normal(size=(n, 2, F))
        raw = rng.uniform(0.3, 1.0, (n, 2))
        score = rng.uniform(0, 1, (n, 2))
        agree = rng.uniform(size=(n, 2)) < 0.8
        pos = rng.integers(0, 3, n)
        ok = np.where(pos < 2, agree[np.arange(n), np.minimum(pos, 1)], True)
        return BatchReport(cfg.sites, cfg.thresholds, cfg.version, score, agree, pos, ok, np.zeros(n), n, None,
                           features=X, ramp_conf=raw, scorer_version=version)

    reps = [report(3, 2), report(2, 1), report(4, 2)]  # the middle batch was served by the fit before
    fb = _merged(reps)
    assert isinstance(fb, EvidenceFeedback) and fb.batch_size == 9
    assert np.array_equal(fb.features, np.concatenate([r.features for r in reps]))
    assert fb.scorer_version.tolist() == [2] * 3 + [1] * 2 + [2] * 4
    assert np.array_equal(fb.released()[0], np.concatenate([r.exit_pos for r in reps]))
    pol.feedback(fb)
    win = pol.controller.window
    assert pol.model.written == win.written == 9
    rows = win.last(9)
    cols = np.arange(2)
    want = np.concatenate([reps[0].conf, pol.model.score(reps[1].features, cols, reps[1].ramp_conf), reps[2].conf])
    assert np.allclose(win.conf[rows], want)  # the stale batch re-scored, the others as served
    assert np.array_equal(win.correct[rows], fb.released_agree)  # exits as served
    # a batch with no active ramp still moves both rings on together
    empty = BatchReport((), (), 5, np.zeros((2, 0)), np.zeros((2, 0), bool), np.zeros(2, np.int64), np.ones(2, bool),
                        np.zeros(2), 2, None, features=np.zeros((2, 0, F)), ramp_conf=np.zeros((2, 0)), scorer_version=2)
    pol.feedback(_merged([empty]))
    assert pol.model.written == win.written == 11
    with pytest.raises(ValueError, match="EvidenceFeedback"):
        pol.feedback(_merged([BatchReport(cfg.sites, cfg.thresholds, 0, np.zeros((1, 2)), np.ones((1, 2), bool),
                                          np.zeros(1, np.int64), np.ones(1, bool), np.zeros(1), 1, None)]))


def test_a_restored_learned_server_goes_on_with_the_saved_fit(tiny_cnn, tmp_path, caplog):
    """A checkpoint keeps the evidence model's fit (not its buffer of features): a restart
    restores the controller (window, config) and scores with the saved fit, its buffer empty and
    level with the restored window. A checkpoint without a usable fit: a fresh evidence model,
    and the log says so."""
    import json
    import logging

    from apparate.core.controller import Config
    from apparate.policies.evidence import LearnedPolicy
    from apparate.serve.control import ControlOptions
    from apparate.serve.state import FILE

    settings = small_settings(evidence_min_inputs=24, evidence_refit_inputs=24, evidence_guard=None)
    opts = ControlOptions(policy="apparate-learned", settings=settings, initial=Config((0, 1), (0.3, 0.3)),
                          state_dir=str(tmp_path), checkpoint_every_s=3600)
    frames = _frames(3, 64)
    with serving(served_cnn(tiny_cnn), control_opts=opts) as a, httpx.Client(base_url=a.url) as c:
        for i in range(0, 64, 8):
            body = {"inputs": [{"name": "input", "shape": [8, 8, 8, 3], "datatype": "UINT8",
                                "data": frames[i:i + 8].reshape(-1).tolist()}]}
            assert c.post("/v2/models/tiny/infer", json=body).status_code == 200
        assert a.engine.flush()
        pol_a = a.engine.control.policy
    # (the last checkpoint is written at shutdown, after the pending feedback)
    cfg_a, written_a = pol_a.config, pol_a.controller.window.written
    version_a, weights_a = pol_a.model.version, pol_a.model.weights.copy()
    assert version_a >= 1
    saved = json.loads((tmp_path / FILE).read_text())
    assert saved["evidence"]["version"] == version_a

    def restart(what_suffix):
        with serving(served_cnn(tiny_cnn), control_opts=opts) as b, httpx.Client(base_url=b.url) as c:
            pol = b.engine.control.policy
            assert isinstance(pol, LearnedPolicy) and (pol.config.sites, pol.config.thresholds) == \
                (cfg_a.sites, cfg_a.thresholds)
            assert b.engine.control.restored["what"] == "profile, config, controller window" + what_suffix
            assert pol.controller.window.written == written_a == pol.model.written  # level from the start
            assert b.engine.live.scorer is pol.scorer()
            assert c.post("/v2/models/tiny/infer", json=image_request(4, seed=1)).status_code == 200
            assert b.engine.flush()
            assert pol.model.written == pol.controller.window.written == written_a + 4
            return pol.model.version, pol.model.weights.copy()

    v, w = restart(f" (evidence fit v{version_a}, buffer fresh)")
    assert v == version_a and np.array_equal(w, weights_a, equal_nan=True)

    saved.pop("evidence")
    (tmp_path / FILE).write_text(json.dumps(saved))
    with caplog.at_level(logging.INFO, logger="apparate.serve"):
        v, w = restart(" (evidence model fresh)")
    assert v == 0 and np.isnan(w).all()
    assert any("no evidence model restored (the checkpoint has none)" in r.getMessage() for r in caplog.records)


def test_restoring_an_evidence_fit_checks_it(tiny_cnn):
    from apparate.core.controller import Config, Controller
    from apparate.core.evidence import F
    from apparate.policies.evidence import LearnedPolicy

    pol = LearnedPolicy("apparate-learned", Controller(tiny_cnn.bundle.profile, small_settings(), Config()), None,
                        seed_window=False)
    good = {"version": 3, "weights": [[0.5] * F, [None] * F]}
    pol.restore_evidence(good)
    assert pol.model.version == 3 and np.isnan(pol.model.weights[1]).all() and pol.scorer().version == 3
    for bad in ({"version": -1, "weights": good["weights"]}, {"version": 1, "weights": [[0.5] * F]},
                {"version": 1, "weights": [[0.5] * F, [None] + [0.5] * (F - 1)]},
                {"version": 1, "weights": "nope"}, {"version": 1, "weights": [[0.5] * F, ["x"] * F]}):
        with pytest.raises(ValueError):
            pol.restore_evidence(bad)
    assert pol.model.version == 3  # a failed restore leaves the fit as it was


def test_serving_apparate_learned_on_text(tiny_text):
    """A text model: no feature movement (recordings keep none for text), the rest as for images."""
    from apparate.core.controller import Config
    from apparate.serve.control import ControlOptions

    from .conftest import WORDS, served_text, text_request

    settings = small_settings(evidence_min_inputs=16, evidence_refit_inputs=16, evidence_guard=None)
    control = ControlOptions(policy="apparate-learned", settings=settings, initial=Config((0, 1), (0.3, 0.3)))
    served = served_text(tiny_text)
    reports = []
    with serving(served, control_opts=control) as live, httpx.Client(base_url=live.url) as c:
        submit = live.engine.control.submit
        live.engine.control.submit = lambda rep: (reports.append(rep), submit(rep))
        rng = np.random.default_rng(0)
        for _ in range(12):
            texts = [" ".join(rng.choice(WORDS, size=3)) for _ in range(4)]
            r = c.post("/v2/models/words/infer", json=text_request(texts))
            assert r.status_code == 200, r.text
        assert live.engine.flush()
        pol = live.engine.control.policy
        assert pol.model.written == pol.controller.window.written == 48
        assert pol.model.version >= 1 and live.engine.live.scorer is pol.scorer()
    fed = [r for r in reports if r.feedback]
    assert fed and all(r.features is not None and np.all(r.features[..., 5] == 0) for r in fed)  # lmove: none


def test_no_batch_sees_half_of_a_swap(tiny_cnn, monkeypatch):
    """Every served batch ran with a (configuration, scorer) pair that the control thread published
    together: a refit's new thresholds never meet the old fit's scores, or the reverse."""
    from apparate.core.controller import Config
    from apparate.serve.control import ControlLoop, ControlOptions

    published: set[tuple[int, int]] = set()
    served_with: list[tuple[int, int]] = []
    publish, submit = ControlLoop._publish, ControlLoop.submit

    def recording_publish(self, cfg):
        publish(self, cfg)
        published.add((self.live.config.version, self.live.scorer.version))

    def recording_submit(self, report):
        served_with.append((report.version, report.scorer_version))
        submit(self, report)

    monkeypatch.setattr(ControlLoop, "_publish", recording_publish)
    monkeypatch.setattr(ControlLoop, "submit", recording_submit)
    served = served_cnn(tiny_cnn)
    settings = small_settings(evidence_min_inputs=16, evidence_refit_inputs=16, evidence_train_inputs=64,
                              evidence_guard=None)
    control = ControlOptions(policy="apparate-learned", settings=settings, initial=Config((0, 1), (0.3, 0.3)),
                             feedback_min_inputs=4)
    frames = _frames(3, 200)
    with serving(served, control_opts=control) as live, httpx.Client(base_url=live.url) as c:
        for i in range(0, len(frames), 2):
            body = {"inputs": [{"name": "input", "shape": [2, 8, 8, 3], "datatype": "UINT8",
                                "data": frames[i:i + 2].reshape(-1).tolist()}]}
            assert c.post("/v2/models/tiny/infer", json=body).status_code == 200
        assert live.engine.flush()
        pol = live.engine.control.policy
        assert pol.model.version >= 2  # several refits, so several swaps, happened while serving
    assert served_with and set(served_with) <= published, sorted(set(served_with) - published)
    assert len({s for _, s in served_with}) >= 2  # batches were served with more than one fit
