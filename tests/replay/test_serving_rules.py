"""The live server's batching rules (`core.serving_rules.ServingRules`) in the replay: full
batches under a backlog, the probe of an idle worker, and a reason per drop through `drive`."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apparate.bench.experiment import ExperimentSpec, make_batcher
from apparate.core.batchers import (LATE, QUEUE_FULL, ClockworkBatcher, Decision, TFServingBatcher, drive,
                                      run_queue)
from apparate.core.controller import Config
from apparate.core.profile import LatencyProfile
from apparate.core.recording import Recording
from apparate.core.serving_rules import PREDICTED_LATE, ServingRules
from apparate.policies.base import ThresholdPolicy
from apparate.replay.simulator import DROPPED, replay

# batch of b takes 8 + 3b ms (11, 14, 17, 20), no ramps paid by the vanilla policy
SIZES = [1, 2, 3, 4]
PROFILE = LatencyProfile(batch_sizes=SIZES, site_ms=[[4.0, 6.0]] * 4, ramp_ms=[[0.5, 0.5]] * 4,
                         vanilla_ms=[8.0 + 3 * b for b in SIZES])


def exec_ms(b: int) -> float:
    return 8.0 + 3 * b


def vanilla_run(arrivals: np.ndarray, batcher, slo_ms: float):
    n = arrivals.size
    conf = np.full((n, 2), 0.5)
    rec = Recording(conf, np.zeros_like(conf, dtype=int), np.zeros(n, dtype=int))
    return replay(rec, arrivals, PROFILE, ThresholdPolicy("vanilla", Config((), ())), batcher, slo_ms)


def test_full_batch_rule_drops_the_oldest_tight_requests_and_meets_more_deadlines():
    # 4 requests at 10 ms fill the first batch (ends 30 ms); 2 arrive at 11 ms (deadline 41) and
    # 4 at 21 ms (deadline 51). At 30 ms plain Clockwork is held to one request by the 11 ms pair
    # (41 ms fits only a batch of 1) and then everything behind is late; the rules drop the pair
    # (predicted late: their deadlines are still ahead) and run the four in a full batch by 50 ms.
    arrivals = np.repeat([0.010, 0.011, 0.021], [4, 2, 4])
    plain = vanilla_run(arrivals, ClockworkBatcher(4), 30.0)
    rules = vanilla_run(arrivals, ServingRules(ClockworkBatcher(4)), 30.0)
    on_time = lambda r: int(np.count_nonzero(r.served & (r.latency_ms <= 30.0 + 1e-9)))
    assert plain.batch_size.tolist() == [4, 1] and on_time(plain) == 5
    assert rules.batch_size.tolist() == [4, 4] and on_time(rules) == 8
    assert rules.drop_reason.tolist() == [""] * 4 + [PREDICTED_LATE] * 2 + [""] * 4
    assert np.flatnonzero(rules.exit_site == DROPPED).tolist() == [4, 5]


def test_the_probe_serves_the_newest_when_everything_is_predicted_late():
    # an SLO shorter than a batch of one: plain Clockwork drops every request; with the rules an
    # idle worker runs the newest waiting one (a fresh measurement) and drops the rest as late
    arrivals = np.array([0.0, 0.001, 0.002, 0.030])
    plain = vanilla_run(arrivals, ClockworkBatcher(4), 5.0)
    rules = vanilla_run(arrivals, ServingRules(ClockworkBatcher(4)), 5.0)
    assert plain.served.sum() == 0 and set(plain.drop_reason) == {LATE}
    assert rules.served.tolist() == [True, False, True, True]
    assert rules.drop_reason.tolist() == ["", LATE, "", ""]  # its deadline (6 ms) passed by 11 ms


class Spy:
    """A batcher that remembers every decision it was asked for (queue length, answer)."""

    def __init__(self, inner):
        self.inner, self.seen, self.late = inner, [], []
        self.max_batch = inner.max_batch
        self.takes_reprice = getattr(inner, "takes_reprice", False)

    def decide(self, now, arrivals, deadlines, exec_ms, **kw):
        d = self.inner.decide(now, arrivals, deadlines, exec_ms, **kw)
        self.seen.append((len(deadlines), d))
        self.late.append([(deadlines[i] <= now, why) for i, why in zip(d.drop, d.drop_reasons())])
        return d


@settings(max_examples=150, deadline=None)
@given(gaps=st.lists(st.floats(0.0, 0.02), min_size=1, max_size=40), slo_ms=st.floats(1.0, 60.0),
       tf=st.booleans(), seed=st.integers(0, 3))
def test_an_idle_worker_never_drops_everything_for_lateness(gaps, slo_ms, tf, seed):
    arrivals = np.cumsum(gaps)
    inner = TFServingBatcher(4, 2.0, 2) if tf else ClockworkBatcher(4)
    spy = Spy(ServingRules(inner))
    run = vanilla_run(arrivals, spy, slo_ms)
    for (n, d), passed in zip(spy.seen, spy.late):  # drive asks only while the worker is idle
        lateness = all(why in (LATE, PREDICTED_LATE) for why in d.drop_reasons())
        assert d.start or len(d.drop) < n or not lateness
        # truthful reasons: `late` only past the deadline, `predicted late` only before it
        # (also where pre-shedding emptied the queue and the newest is probed)
        assert all(p for p, why in passed if why == LATE)
        assert not any(p for p, why in passed if why == PREDICTED_LATE)
    assert run.served.any()  # the first request always finds the worker idle and is run
    assert set(run.drop_reason) <= {"", LATE, PREDICTED_LATE, QUEUE_FULL}  # nothing left unserved


def test_drive_reports_each_drop_with_its_own_reason():
    # TF Serving with one waiting batch of one request, behind a busy worker until 11 ms: then
    # request 1 is past its deadline (late), request 2 cannot make it (predicted late), request 3
    # opens the one batch and request 4 finds the queue full; all in one decision.
    arrivals = np.array([0.0, 0.001, 0.002, 0.003, 0.004])
    slo = np.array([100.0, 5.0, 15.0, 100.0, 100.0])
    rules = ServingRules(TFServingBatcher(2, 0.0, 1))
    spy = Spy(rules)
    res = run_queue(arrivals, slo, spy, exec_ms)
    assert res.reason.tolist() == ["", LATE, PREDICTED_LATE, "", QUEUE_FULL]
    n, d = spy.seen[1]
    assert n == 4 and d.drop == (0, 1, 3) and d.start == 1
    assert d.drop_reasons() == (LATE, PREDICTED_LATE, QUEUE_FULL) and d.reason == ""


def test_decision_reasons_default_to_the_shared_one_and_must_align():
    assert Decision(drop=(0, 2), reason=LATE).drop_reasons() == (LATE, LATE)
    assert Decision.per_drop(1, (0, 2), (LATE, LATE)) == Decision(start=1, drop=(0, 2), reason=LATE)
    assert Decision.per_drop(0, (), ()) == Decision()
    with pytest.raises(ValueError):
        Decision(drop=(0, 1), reasons=(LATE,))

    def plain(now, arrivals, deadlines, exec_ms):
        return Decision(drop=(0,), reasons=(QUEUE_FULL,))
    seen: dict[int, str] = {}
    batcher = type("B", (), {"max_batch": 1, "decide": staticmethod(plain)})()
    left = drive(np.array([0.0]), np.array([1.0]), batcher, lambda q: exec_ms, lambda m, t: t, seen.__setitem__)
    assert seen == {0: QUEUE_FULL} and left == []


def test_pre_shedding_reprices_the_queue_it_leaves():
    got = []

    class Inner:
        max_batch = 4

        def decide(self, now, arrivals, deadlines, exec_ms):
            got.append((deadlines.size, exec_ms(1)))
            return Decision(start=1)

    deadlines = np.array([0.005, 1.0, 1.0])  # the first cannot finish in 11 ms
    d = ServingRules(Inner()).decide(0.0, np.zeros(3), deadlines, exec_ms,
                                     reprice=lambda keep: (lambda b: 100.0 + keep.size))
    assert got == [(2, 102.0)] and d.drop == (0,) and d.drop_reasons() == (PREDICTED_LATE,)


def test_replay_batching_names_wrap_the_batcher_as_the_server_does():
    assert make_batcher(ExperimentSpec("w", batching="clockwork")) == ClockworkBatcher(16)
    live = make_batcher(ExperimentSpec("w", batching="clockwork+serve"))
    assert live == ServingRules(ClockworkBatcher(16), shed=True) and live.fuller and not live.pre_shed
    tf = make_batcher(ExperimentSpec("w", batching="tfserving+serve"))
    assert isinstance(tf.inner, TFServingBatcher) and tf.pre_shed and not tf.fuller
    with pytest.raises(ValueError):
        make_batcher(ExperimentSpec("w", batching="fifo+serve"))
