"""`apparate+heads` in replay is the server's policy fed what a server would feed it: only the
active sites' heads learn (a server sees no other site's features), a site whose head changed
answers, is judged and gives feedback with the new head, the controller's window is re-scored
with it, and a replay repeats its decisions."""

from __future__ import annotations

import numpy as np

from apparate.core.batchers import ClockworkBatcher
from apparate.core.heads import head_scores
from apparate.core.profile import LatencyProfile
from apparate.core.recording import Recording
from apparate.core.settings import Settings
from apparate.policies.catalog import PolicyInputs, RampFamily, make_policy
from apparate.policies.heads import ReplayedHeadsPolicy
from apparate.replay.simulator import replay


def _site_stream(n, S, flip_at, seed):
    """Features per site; the final answer follows feature 0 until `flip_at`, then feature 1. The
    bundle's heads read feature 0 only, so after the drift they must learn to agree again."""
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


def _replay(S=4, n=3000):
    prof = LatencyProfile.linear(S, vanilla_ms=5.0, ramp_fraction=0.004)
    boot = _recording(*_site_stream(800, S, flip_at=10**9, seed=1))
    stream = _recording(*_site_stream(n, S, flip_at=1000, seed=2))
    fam = RampFamily(boot, stream, prof)
    # two active ramps at most, so that some sites are never active
    settings = Settings(accuracy_constraint=0.05, ramp_budget=0.0085, head_every=100, head_buffer=300, head_lag=0)
    policy = make_policy("apparate+heads", PolicyInputs(fam, settings, heads=fam, serving=(1.0, None)))
    assert isinstance(policy, ReplayedHeadsPolicy)
    answers = []  # (stream positions, the heads table) of each batch, as the simulator asked
    ask = policy.ramp_answers

    def spy(index, conf, agree, pred):
        answers.append((np.arange(n)[index], policy.table()))
        return ask(index, conf, agree, pred)

    policy.ramp_answers = spy
    run = replay(stream, np.arange(n) / 100.0, prof, policy, ClockworkBatcher(4), slo_ms=100.0)
    return policy, run, stream, answers


def test_only_active_sites_learn_and_a_new_head_answers_as_served():
    policy, run, stream, answers = _replay()
    assert policy.swaps > 0, "the drift should make new heads go live"
    active = np.zeros((stream.num_inputs, stream.num_sites), dtype=bool)  # input i ran with site s active
    for b, sites in enumerate(run.batch_sites):
        active[np.ix_(np.flatnonzero(run.batch == b), list(sites))] = True
    for s, learner in policy.learners.items():
        assert learner.seen == int(active[:, s].sum()), s  # exactly the inputs it served, no other
    never = [s for s in range(stream.num_sites) if not active[:, s].any()]
    assert never, "some site should never be active (the budget admits two ramps)"
    for s in never:
        assert s not in policy.table().heads
    # every released answer is judged with the head live when its batch ran
    for idx, table in answers:
        at = idx[run.exit_site[idx] >= 0]
        for i in at:
            s = int(run.exit_site[i])
            w, b = table.heads.get(s, stream.heads[s])
            _, p = head_scores(stream.features[s][i:i + 1].astype(np.float32), np.asarray(w, np.float64),
                               np.asarray(b, np.float64))
            assert run.correct[i] == (p[0] == stream.final[i]), (i, s)
    # the heads learned the drift: after it, a changed head agrees with the final answer more
    late = slice(2000, None)
    for s, (w, b) in policy.table().heads.items():
        _, p_new = head_scores(stream.features[s][late].astype(np.float32), w, b)
        assert np.mean(p_new == stream.final[late]) > np.mean(stream.pred[late, s] == stream.final[late]) + 0.1, s


def test_the_window_holds_the_live_heads_view_and_a_replay_repeats_itself():
    policy, run, stream, _ = _replay()
    win = policy.controller.window
    rows = win.last(min(win.written, win.size))
    for s, (w, b) in policy.table().heads.items():
        have = policy._have[rows, s] & ~np.isnan(win.conf[rows, s])
        assert have.any()
        c, p = head_scores(policy._feat[s][rows[have]], w, b)
        assert np.allclose(win.conf[rows[have], s], c, atol=1e-6), s
        assert np.array_equal(win.agree[rows[have], s], p == policy._final[rows[have]]), s
    again, run2, _, _ = _replay()
    assert np.array_equal(run.exit_site, run2.exit_site) and np.array_equal(run.correct, run2.correct)
    assert again.version == policy.version and again.table().heads.keys() == policy.table().heads.keys()
