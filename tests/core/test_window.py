import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from apparate.core.types import Config, Feedback, released
from apparate.core.window import Window

S = 5
CONFIGS = [Config((1, 3), (0.2, 0.4)), Config((0, 2, 4), (0.1, 0.0, 0.3)), Config((), ())]


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 12), st.lists(st.tuples(st.integers(1, 20), st.integers(0, 2), st.integers(0, 2)),
                                    min_size=1, max_size=12), st.integers(0, 1000))
def test_the_ring_holds_the_latest_inputs_as_a_plain_list_would(W, batches, seed):
    # Batches of any size, wrapping around the ring or larger than it, served with the current
    # configuration or an older one: the window's rows for the latest inputs are what a plain
    # list of every input ever seen says, and so are the wrong-answer counts it returns.
    rng = np.random.default_rng(seed)
    win = Window(W, S)
    seen = []  # per input: (conf row over all sites, agree row, batch size, exit site, batch index, ok, cf_ok)
    for b, (n, served_with, current) in enumerate(batches):
        fb_cfg, cfg = CONFIGS[served_with], CONFIGS[current]
        cols = list(fb_cfg.sites)
        conf = rng.uniform(0.5, 1.0, (n, len(cols)))
        agree = rng.uniform(size=(n, len(cols))) < 0.7
        fb = Feedback(fb_cfg.sites, fb_cfg.thresholds, conf, agree)
        wrong, cf_wrong = win.record(fb, b, cfg)
        idx, ok = released(conf, agree, np.asarray(fb_cfg.thresholds))
        full_c, full_a = np.full((n, S), np.nan), np.zeros((n, S), dtype=bool)
        full_c[:, cols], full_a[:, cols] = conf, agree
        ccols = list(cfg.sites)
        firing = [j for j, t in enumerate(cfg.thresholds) if t > 0]
        _, cf_ok = released(np.nan_to_num(full_c[:, ccols]), full_a[:, ccols], np.asarray(cfg.thresholds))
        cf_valid = ~np.isnan(full_c[:, [ccols[j] for j in firing]]).any(axis=1) if firing else np.ones(n, bool)
        site_of = np.append(np.asarray(cols, dtype=np.int64), -1)
        for i in range(n):
            seen.append((full_c[i], full_a[i], n, site_of[idx[i]], b, ok[i], cf_ok[i], cf_valid[i]))
        kept = slice(max(n - W, 0), n)
        assert wrong == int((~ok).sum())
        assert cf_wrong == int((cf_valid[kept] & ~cf_ok[kept]).sum())
        rows = win.last(W)
        latest = seen[-rows.size:]
        assert rows.size == min(len(seen), W)
        np.testing.assert_array_equal(win.conf[rows], np.array([x[0] for x in latest]))
        np.testing.assert_array_equal(win.agree[rows], np.array([x[1] for x in latest]))
        np.testing.assert_array_equal(win.bs[rows], [x[2] for x in latest])
        np.testing.assert_array_equal(win.exit[rows], [x[3] for x in latest])
        np.testing.assert_array_equal(win.batch[rows], [x[4] for x in latest])
        np.testing.assert_array_equal(win.correct[rows], [x[5] for x in latest])
    # The counterfactual of the latest batch's rows follows the configuration it was recorded under.
    n_last = min(batches[-1][0], W)
    rows = win.last(n_last)
    np.testing.assert_array_equal(win.cf_valid[rows], [x[7] for x in seen[-n_last:]])
    valid = win.cf_valid[rows]
    np.testing.assert_array_equal(win.cf_ok[rows][valid], np.array([x[6] for x in seen[-n_last:]])[valid])


def test_one_sampled_wrong_answer_is_one_piece_of_change_evidence_not_twenty():
    # Early stop: a sampled exited row weighs 20 (it stands for 20 inputs). Its loss counts 20
    # times in every estimate, but as evidence of a change it is one observation: a single wrong
    # sampled answer must not look like 20 wrong answers in a row.
    cfg = Config((1,), (0.5,))
    win = Window(512, S)
    n = 200
    conf = np.full((n, 1), 0.9)  # every input released at ramp 1
    agree = np.ones((n, 1), dtype=bool)
    agree[-1] = False  # the newest is wrong
    w = np.ones(n)
    w[::4] = 20.0  # sampled exits
    w[-1] = 20.0
    win.record(Feedback(cfg.sites, cfg.thresholds, conf, agree, weight=w), 0, cfg)
    start, evidence = win.change_point(0.02)
    assert start == win.written - 1  # the change would start at that one answer
    assert evidence < 1.5  # one observation's worth, not 20 * 0.98
    plain = Window(512, S)
    plain.record(Feedback(cfg.sites, cfg.thresholds, conf, agree), 0, cfg)
    assert plain.change_point(0.02)[1] == pytest.approx(0.98)  # unweighted: as before


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 40), st.lists(st.tuples(st.integers(1, 15), st.integers(0, 3)), min_size=1, max_size=15),
       st.integers(1, 60), st.integers(0, 1000))
def test_recent_wrong_counts_the_latest_inputs_wrong_answers_as_a_plain_list_would(W, batches, k, seed):
    # The window guard reads how many of the latest k inputs were answered wrongly, rows weighted
    # by the inputs they stand for (early stop's sampled rows): walking a plain list of every row
    # newest first, a row counts while the rows after it stand for fewer than k inputs.
    rng = np.random.default_rng(seed)
    cfg = Config((1,), (0.5,))
    win = Window(W, S)
    rows = []  # (wrong as served, weight)
    for b, (n, weighted) in enumerate(batches):
        conf = rng.uniform(0.3, 1.0, (n, 1))  # released at ramp 1 when >= 0.5, else at the end
        agree = rng.uniform(size=(n, 1)) < 0.6
        w = np.where(rng.uniform(size=n) < 0.5, 20.0, 1.0) if weighted == 3 else None
        win.record(Feedback(cfg.sites, cfg.thresholds, conf, agree, weight=w), b, cfg)
        _, ok = released(conf, agree, np.asarray(cfg.thresholds))
        rows += list(zip(~ok, np.ones(n) if w is None else w))
    rows = rows[-W:]  # what the ring holds
    expect, before = 0.0, 0.0
    for wrong, w in reversed(rows):
        if before >= k:
            break
        expect += w * wrong
        before += w
    assert win.recent_wrong(k) == pytest.approx(expect)
