"""Early stop in replay (issue 19): exited inputs leave the batch while work waits, a sampled
share runs on, and the controller's estimates from the weighted survivors stay unbiased."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from apparate.core.controller import Config
from apparate.core.settings import Settings
from apparate.core.profile import LatencyProfile
from apparate.core.synthetic import synthetic_window
from apparate.core.types import Feedback, released
from apparate.core.window import Window
from apparate.policies import PolicyInputs, make_policy
from apparate.policies.base import ThresholdPolicy
from apparate.core.sampling import FeedbackSampler, leave_sites
from apparate.policies.base import Plan
from apparate.replay.early_stop import run_stopped
from apparate.replay.simulator import FINAL, replay
from apparate.replay.summary import summarize
from apparate.zoo import traces
from apparate.core.batchers import ClockworkBatcher

from .test_simulator import TINY, synthetic_family, tiny_recording


def test_a_released_input_leaves_its_batch_when_work_waits_by_hand():
    # Inputs 0 and 1 arrive at 0, input 2 at 1 ms. The batch {0, 1} reaches ramp 0 at 3 + 1 = 4 ms
    # (batch-2 costs); input 0 leaves there (input 2 waits), so input 1 runs on alone: from site 0
    # at batch 1, 10 - 2 = 8 ms more, released at 12 ms (15 ms without early stop). Input 2 then
    # runs alone from 12 ms: 2 + 0.5 + 8 = 10.5 ms.
    rec = tiny_recording([0.9, 0.5, 0.5])
    policy = ThresholdPolicy("one-ramp", Config((0,), (0.2,)))
    policy.early_stop = 0.05  # the first coin of the seeded generator (0.64) does not keep it
    run = replay(rec, np.array([0.0, 0.0, 0.001]), TINY, policy, ClockworkBatcher(2), slo_ms=1000)
    assert run.latency_ms == pytest.approx([4.0, 12.0, 21.5])
    assert run.exit_site.tolist() == [0, FINAL, FINAL]
    assert run.completed.tolist() == [False, True, True]
    assert run.batch_exec_ms == pytest.approx([12.0, 10.5])
    assert summarize(run).completed == pytest.approx(2 / 3)


def test_an_idle_server_runs_every_input_to_the_end():
    rec = tiny_recording([0.9, 0.5, 0.95])
    policy = ThresholdPolicy("one-ramp", Config((0,), (0.2,)))
    policy.early_stop = 0.05
    # each input arrives after the previous batch ended: nothing ever waits
    run = replay(rec, np.array([0.0, 0.02, 0.1]), TINY, policy, ClockworkBatcher(2), slo_ms=1000)
    assert run.completed.all()
    assert run.latency_ms == pytest.approx([2.5, 10.5, 2.5])


def test_inputs_leave_only_where_enough_of_the_pass_remains():
    prof = LatencyProfile.linear(8, vanilla_ms=10.0, ramp_fraction=0.01)
    rest = 1.0 - prof.table(1.0, range(8)).site_ms / prof.table(1.0, range(8)).vanilla_ms
    assert leave_sites(prof, 0.0) == frozenset(range(8))
    for m in (0.05, 0.3, 0.6, 0.99):
        got = leave_sites(prof, m)
        assert got == frozenset(int(s) for s in np.flatnonzero(rest >= m))
        assert got == frozenset(range(len(got)))  # the earliest sites: a prefix
    # the last site leaves too little: its released inputs run to the end, whole (weight 1)
    sites = (1, 7)
    exit_pos = np.array([1, 1, 0, 2])
    near = run_stopped(prof, sites, None, exit_pos, 0.0, lambda t: True, 0.05, np.random.default_rng(1),
                       can_leave=leave_sites(prof, 0.2))
    assert near.completed[exit_pos == 1].all() and np.all(near.weight[exit_pos == 1] == 1.0)
    assert not near.completed[2]  # site 1 leaves enough: the first coin (0.51) lets it go
    anywhere = run_stopped(prof, sites, None, exit_pos, 0.0, lambda t: True, 0.05, np.random.default_rng(1))
    assert not anywhere.completed[exit_pos == 1].all()
    # a policy with early stop asks the same question of its profile
    fam = synthetic_family(n=50, S=8)
    pol = make_policy("apparate-stop", PolicyInputs(fam))
    assert pol.stop_sites == leave_sites(fam.profile, pol.controller.settings.stop_min_rest)


def test_a_batch_whose_inputs_all_left_stops_at_that_ramp():
    prof = LatencyProfile.linear(4, vanilla_ms=10.0, ramp_fraction=0.01)
    sites = (1, 2)
    out = run_stopped(prof, sites, None, np.array([0, 0, 1]), 0.0, lambda t: True, 0.5, np.random.default_rng(3))
    tab_full = prof.table(3, sites)
    assert not out.completed.any() or out.end_ms >= out.release_ms.max()
    if not out.completed.any():
        assert out.end_ms == pytest.approx(out.release_ms.max())
        assert out.end_ms < tab_full.end_ms


def random_batch(k: int, R: int, seed: int) -> tuple[LatencyProfile, tuple[int, ...], np.ndarray]:
    """A linear 6-site profile, R random active sites and k inputs' random releasing ramps."""
    rng = np.random.default_rng(seed)
    sites = tuple(sorted(rng.choice(6, size=R, replace=False).tolist()))
    return LatencyProfile.linear(6, vanilla_ms=10.0, ramp_fraction=0.01), sites, rng.integers(0, R + 1, size=k)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 16), st.integers(0, 3), st.floats(0.0, 30.0), st.sampled_from([1.0, 0.5, 0.2, 0.05]),
       st.integers(0, 10_000))
def test_early_stop_never_delays_an_answer_and_weights_are_inverse_probabilities(k, R, wait_from_ms, share, seed):
    prof, sites, exit_pos = random_batch(k, R, seed)
    out = run_stopped(prof, sites, None, exit_pos, 0.0, lambda t: t * 1e3 >= wait_from_ms, share,
                      np.random.default_rng(seed))
    full = prof.table(k, sites)
    assert np.all(out.release_ms <= full.all_ms[exit_pos] + 1e-9)
    assert out.end_ms <= full.end_ms + 1e-9
    assert out.completed[exit_pos == R].all()  # an input no ramp released always runs to the end
    assert set(np.unique(out.weight)) <= {1.0, 1.0 / share}
    assert np.all(out.weight[~out.completed] == 1.0)
    if share == 1.0 or wait_from_ms > full.end_ms:  # nothing leaves: exactly the full pass
        assert out.completed.all()
        assert out.release_ms == pytest.approx(full.all_ms[exit_pos])
        assert out.end_ms == pytest.approx(full.end_ms)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.floats(200, 2000), st.integers(0, 20))
def test_with_every_exited_input_sampled_early_stop_decides_as_apparate_does(rate, seed):
    fam = synthetic_family(n=800, seed=seed)
    arrivals = np.asarray(traces.poisson(rate, n=800, seed=seed))
    plain = replay(fam.evaluation, arrivals, fam.profile, make_policy("apparate", PolicyInputs(fam)),
                   ClockworkBatcher(16), slo_ms=40)
    sampled = make_policy("apparate", PolicyInputs(fam))
    sampled.early_stop = 1.0  # every exited input runs on, with weight 1
    stop = replay(fam.evaluation, arrivals, fam.profile, sampled, ClockworkBatcher(16), slo_ms=40)
    assert stop.completed[stop.served].all()
    assert stop.exit_site.tolist() == plain.exit_site.tolist()
    assert stop.batch_version.tolist() == plain.batch_version.tolist()
    assert np.allclose(stop.release, plain.release, equal_nan=True, rtol=0, atol=1e-9)


def test_weighted_feedback_estimates_the_loss_without_bias():
    # A stream where the truth is known: 2 ramps over 5 sites, served with a config that releases
    # about half the inputs early. Only the sampled exited inputs (share 1/10) report back, with
    # weight 10; the window's weighted loss, for the config served and for a bolder one, matches
    # the loss over every input within the spread of the estimates.
    n, S, share = 3000, 5, 0.1
    conf, agree = synthetic_window(n, S, seed=7)
    served = Config((1, 3), (0.15, 0.25))
    bolder = Config((1, 3), (0.3, 0.4))
    truth = {}
    for cfg in (served, bolder):
        _, ok = released(conf[:, list(cfg.sites)], agree[:, list(cfg.sites)], np.asarray(cfg.thresholds))
        truth[cfg] = 1.0 - ok.mean()
    exit_idx, _ = released(conf[:, [1, 3]], agree[:, [1, 3]], np.asarray(served.thresholds))
    early = exit_idx < 2
    assert 0.3 < early.mean() < 0.8
    est = {served: [], bolder: []}
    for seed in range(60):
        keep = ~early | (np.random.default_rng(seed).uniform(size=n) < share)
        w = np.where(early, 1.0 / share, 1.0)[keep]
        fb = Feedback(served.sites, served.thresholds, conf[keep][:, [1, 3]], agree[keep][:, [1, 3]], weight=w)
        for cfg in (served, bolder):
            win = Window(n, S)
            win.record(fb, 0, cfg)
            loss, evidence = win.counterfactual_loss(n)
            assert evidence < keep.sum()  # weighted rows count for less than as many plain ones
            est[cfg].append(loss)
    for cfg, values in est.items():
        values = np.asarray(values)
        se = values.std(ddof=1) / np.sqrt(values.size)
        assert abs(values.mean() - truth[cfg]) <= 3 * se + 1e-4, (cfg, values.mean(), truth[cfg], se)
        # the unweighted share of wrong among the survivors is biased: a check that the test can fail
    unweighted = 1.0 - released(conf[~early][:, [1, 3]], agree[~early][:, [1, 3]], np.asarray(bolder.thresholds))[1].mean()
    assert abs(unweighted - truth[bolder]) > 3 * np.std(est[bolder])


def test_apparate_with_early_stop_keeps_the_constraint_with_sampled_feedback_alone():
    # Saturated (work nearly always waits), so feedback comes almost only from the inputs no ramp
    # released and the sampled 5% of the rest; stationary streams, several seeds. (Under abrupt
    # drift the sparse sample reacts later: docs/results.md has the figures.)
    accs, completed = [], []
    for seed in range(4):
        fam = synthetic_family(n=3000, seed=seed, drift=False)
        arrivals = np.asarray(traces.poisson(3000, n=3000, seed=seed))
        policy = make_policy("apparate-stop", PolicyInputs(fam))
        run = replay(fam.evaluation, arrivals, fam.profile, policy, ClockworkBatcher(16), slo_ms=1000)
        m = summarize(run)
        accs.append(m.accuracy)
        completed.append(m.completed)
        assert policy.controller.window.w.max() == pytest.approx(20.0)  # sampled exited inputs, share 5%
    assert np.mean(completed) < 0.8  # early stop really happened
    assert np.mean(accs) >= 0.99


def test_a_wrong_sampled_answer_raises_the_share_to_every_input_for_a_while():
    fam = synthetic_family(n=200, seed=1, drift=False)
    policy = make_policy("apparate-stop", PolicyInputs(fam))
    assert policy.early_stop == pytest.approx(0.05)
    cfg = policy.config
    conf, agree = fam.evaluation.conf[:4].astype(np.float64), fam.evaluation.agree[:4]
    plan = Plan(cfg.sites, np.zeros(4, dtype=np.int64), cfg.thresholds, cfg.version)
    completed = np.array([True, False, False, False])
    weight = np.array([20.0, 1.0, 1.0, 1.0])
    every = np.ones(4, dtype=bool)
    policy.observe_stopped(plan, conf, agree, None, every, completed, weight)
    assert policy.early_stop == pytest.approx(0.05)  # a right answer changes nothing
    policy.observe_stopped(plan, conf, agree, None, np.array([False, True, True, True]), completed, weight)
    assert policy.early_stop == 1.0
    alarm = policy.controller.settings.stop_alarm
    for _ in range(alarm // 4 - 1):
        policy.observe_stopped(plan, conf, agree, None, every, every, np.ones(4))
    assert policy.early_stop == 1.0
    policy.observe_stopped(plan, conf, agree, None, every, every, np.ones(4))
    assert policy.early_stop == pytest.approx(0.05)


@settings(max_examples=40, deadline=None)
@given(st.floats(0.01, 1.0), st.floats(0.05, 0.95), st.integers(1, 16), st.integers(0, 1000))
def test_the_sampler_alarms_on_a_shift_in_exits_and_not_on_a_steady_stream(floor, level, batch, seed):
    s = FeedbackSampler(floor, alarm=100)
    assert abs(1 / s.floor - round(1 / s.floor)) < 1e-9 and s.floor <= floor * 1.5
    rng = np.random.default_rng(seed)
    for _ in range(400 // batch):  # steady: the same share of exits in every batch
        s.update(rng.permutation(np.arange(batch) < round(level * batch)), False)
    steady = s.alarms["shift"]
    assert steady == 0 and s.share == s.floor
    shifted = np.full(batch, round(level * batch) / batch < 0.5)  # all exit, or none
    for _ in range(64):
        s.update(shifted, False)
        if s.alarms["shift"]:  # the inputs changed: every exited input runs on for a while
            break
    assert s.alarms["shift"] == 1 and s.share == 1.0


def test_bolder_configurations_are_checked_on_full_feedback_when_asked():
    # `stop_alarm_bolder`: a raised threshold or an added ramp sends every exited input to the
    # end for a while. On a saturated synthetic stream the controller makes its configuration
    # bolder a few times; with the option on, each raises the alarm, and more inputs complete.
    from apparate.core.sampling import bolder_than
    from apparate.core.settings import Settings

    assert bolder_than((1, 3), (0.2, 0.1), Config((1, 3), (0.2, 0.3)))
    assert bolder_than((1,), (0.2,), Config((1, 2), (0.2, 0.05)))
    assert not bolder_than((1, 3), (0.2, 0.1), Config((1, 3), (0.1, 0.1)))
    assert not bolder_than((1, 3), (0.2, 0.1), Config((1,), (0.2,)))
    fam = synthetic_family(n=3000, seed=0)
    arrivals = np.asarray(traces.poisson(3000, n=3000, seed=0))
    done = {}
    for on in (False, True):
        policy = make_policy("apparate-stop", PolicyInputs(fam, settings=Settings(stop_alarm_bolder=on)))
        run = replay(fam.evaluation, arrivals, fam.profile, policy, ClockworkBatcher(16), slo_ms=1000)
        done[on] = summarize(run).completed
        assert (policy.sampler.alarms["bolder"] > 0) == on
    assert done[True] > done[False]


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 16), st.integers(1, 3), st.sampled_from([1.0, 0.5, 0.2, 0.05]), st.integers(0, 20),
       st.integers(0, 10_000))
def test_inputs_that_leave_join_the_pool_first_come_and_weigh_one_while_it_has_room(k, R, share, room, seed):
    prof, sites, exit_pos = random_batch(k, R, seed)
    plain = run_stopped(prof, sites, None, exit_pos, 0.0, lambda t: True, share, np.random.default_rng(seed))
    pooled = run_stopped(prof, sites, None, exit_pos, 0.0, lambda t: True, share, np.random.default_rng(seed),
                         room=room)
    # the same coins: the same inputs leave, at the same times; the pool changes only who comes back
    assert np.array_equal(pooled.completed, plain.completed)
    assert pooled.release_ms == pytest.approx(plain.release_ms) and pooled.end_ms == pytest.approx(plain.end_ms)
    order = [i for j in range(R) for i in np.flatnonzero(exit_pos == j)]  # as the pass releases them
    leavers = [i for i in order if not plain.completed[i]]
    assert np.flatnonzero(pooled.deferred).tolist() == sorted(leavers[:room])
    for i in order:  # kept by the coin: 1 if the pool had room at its coin, else 1/share
        if pooled.completed[i]:
            before = sum(1 for x in leavers if order.index(x) < order.index(i))
            assert pooled.weight[i] == (1.0 if before < room else 1.0 / share)
    assert np.all(pooled.weight[exit_pos == R] == 1.0)


@pytest.mark.parametrize("cap,resume", [(4, False), (4000, False), (4000, True)])
def test_with_a_feedback_pool_every_pooled_input_comes_back_once(cap, resume):
    # Saturated (work nearly always waits), a drifting stream. With a pool that can hold them all,
    # every served input reaches the controller exactly once, with weight 1: feedback as complete
    # as without early stop, only later. With a small one the rest is sampled as before.
    fam = synthetic_family(n=2000, seed=3)
    arrivals = np.asarray(traces.poisson(1500, n=2000, seed=3))
    policy = make_policy("apparate-stop", PolicyInputs(fam, settings=Settings(stop_pool=cap, stop_pool_resume=resume)))
    fed: list = []
    learn = policy.feedback
    policy.feedback = lambda fb: (fed.append(fb), learn(fb))[1]
    run = replay(fam.evaluation, arrivals, fam.profile, policy, ClockworkBatcher(16), slo_ms=1000)
    rows = sum(fb.batch_size for fb in fed)
    weight = sum(fb.batch_size if fb.weight is None else fb.weight.sum() for fb in fed)
    pool = policy.pool
    assert len(pool) == 0 and pool.counts["joined"] == pool.counts["idle"] + pool.counts["forced"]
    assert summarize(run).completed < 0.9  # inputs really left their batches
    if cap == 4000:
        assert pool.counts["joined"] == run.served.sum() - run.completed.sum() > 0
        assert rows == weight == run.served.sum()
    else:
        assert 0 < pool.counts["joined"] < run.served.sum() - run.completed.sum()
        assert rows < run.served.sum() and weight > rows


def test_resuming_where_they_left_runs_pooled_inputs_in_less_time():
    # `stop_pool_resume` (replay only): a pooled input costs the rest of the pass from its ramp,
    # not a whole pass, so fewer of its runs are cut short by an arriving request.
    fam = synthetic_family(n=2000, seed=4)
    arrivals = np.asarray(traces.poisson(150, n=2000, seed=4))  # moderate load: idle gaps
    pools = {}
    for resume in (False, True):
        policy = make_policy("apparate-stop", PolicyInputs(fam, settings=Settings(stop_pool=64, stop_pool_resume=resume)))
        replay(fam.evaluation, arrivals, fam.profile, policy, ClockworkBatcher(16), slo_ms=1000)
        pools[resume] = policy.pool.counts
    assert pools[False]["joined"] > 50 and pools[True]["joined"] > 50
    assert pools[True]["abandoned"] / pools[True]["joined"] < pools[False]["abandoned"] / pools[False]["joined"]
