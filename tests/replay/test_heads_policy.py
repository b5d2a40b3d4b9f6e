"""`apparate+heads` in replay: when a new head goes live, the controller's window is re-scored
with it before any batch uses it (no window mixes two heads' confidences at a site)."""

from __future__ import annotations

import numpy as np

from apparate.core.batchers import ClockworkBatcher
from apparate.core.heads import HeadLearning, head_scores, relearn
from apparate.core.profile import LatencyProfile
from apparate.core.recording import Recording
from apparate.core.settings import Settings
from apparate.policies.catalog import PolicyInputs, RampFamily, make_policy
from apparate.replay.simulator import replay


def _site_stream(n, S, flip_at, seed):
    rng = np.random.default_rng(seed)
    feats, heads = [], []
    base = rng.normal(size=(n, 4))
    y = np.where(np.arange(n) < flip_at, base[:, 0] > 0, base[:, 1] > 0).astype(np.int64)
    for s in range(S):  # later sites see the inputs more clearly
        feats.append((base + rng.normal(scale=1.0 / (s + 1), size=base.shape)).astype(np.float16))
        w = np.zeros((2, 4))
        w[1, 0], w[0, 0] = 3.0, -3.0
        heads.append((w, np.zeros(2)))
    return feats, heads, y


def _recording(feats, heads, y):
    cols = [head_scores(f.astype(np.float32), w, b) for f, (w, b) in zip(feats, heads)]
    conf = np.stack([c for c, _ in cols], axis=1)
    pred = np.stack([p for _, p in cols], axis=1)
    return Recording(conf, pred, y, features=tuple(feats), heads=tuple(heads))


def test_a_new_head_rescores_the_window_before_it_answers():
    S, n = 3, 3000
    prof = LatencyProfile.linear(S, vanilla_ms=5.0, ramp_fraction=0.004)
    boot = _recording(*_site_stream(800, S, flip_at=10**9, seed=1))
    stream = _recording(*_site_stream(n, S, flip_at=1000, seed=2))
    conf, pred, log = relearn(list(stream.features), list(stream.heads), stream.final,
                              HeadLearning(every=200, buffer=600, lag=16, loss=0.05))
    assert any(log.swaps), "the drift should make new heads go live"
    live = stream.with_answers(conf, pred)
    light = RampFamily(boot, stream, prof)
    heads = RampFamily(boot, live, prof, log)
    settings = Settings(accuracy_constraint=0.05, ramp_budget=0.05)
    policy = make_policy("apparate+heads", PolicyInputs(light, settings, heads=heads, serving=(1.0, None)))
    arrivals = np.arange(n) / 100.0
    run = replay(live, arrivals, prof, policy, ClockworkBatcher(4), slo_ms=100.0)
    assert policy.swaps == sum(map(len, log.swaps))
    win = policy.inner.controller.window
    k = min(len(policy.seen), win.size, win.written)
    rows, idx = win.last(k), np.asarray(list(policy.seen)[-k:])
    rescored = 0
    for s in range(S):
        if not log.live[s]:
            continue
        ran = ~np.isnan(win.conf[rows, s])
        _, w, b = log.live[s][-1]
        newest = idx >= log.live[s][-1][0]  # answered by the last head: as served
        c, p = head_scores(live.features[s][idx].astype(np.float32), w, b)
        # every row of the window at this site is the live head's confidence, served or re-scored
        assert np.allclose(win.conf[rows, s][ran], c[ran], atol=1e-6), s
        assert np.array_equal(win.agree[rows, s][ran], (p == live.final[idx])[ran]), s
        rescored += int((ran & ~newest).sum())
    assert rescored > 0, "no window row older than its site's head: nothing was re-scored"
    assert (run.exit_site >= 0).any()  # the ramps released inputs
