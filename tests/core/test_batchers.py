"""Batchers: max batch, Clockwork deadlines, TF-Serving timeout and queue limit, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apparate.core.batchers import (LATE, QUEUE_FULL, ClockworkBatcher, Decision, TFServingBatcher,
                                      finish_time, run_queue)


def linear(base_ms: float, per_item_ms: float):
    return lambda b: base_ms + per_item_ms * b


# Execution-time models: a base plus per-item cost, optionally with an arbitrary (even
# non-monotone) per-size bump, as a measured profile could have.
exec_models = st.builds(
    lambda base, per, bumps: (lambda b: base + per * b + bumps[(b - 1) % len(bumps)]),
    st.floats(0.0, 50.0), st.floats(0.0, 20.0), st.lists(st.floats(0.0, 10.0), min_size=1, max_size=8))


@st.composite
def queues(draw):
    """(now, arrivals, deadlines): a queue seen at `now`, oldest first, deadlines possibly uneven."""
    n = draw(st.integers(0, 40))
    now = draw(st.floats(0.0, 10.0))
    ages = sorted(draw(st.lists(st.floats(0.0, 0.5), min_size=n, max_size=n)), reverse=True)
    arrivals = now - np.asarray(ages, dtype=np.float64)
    slo = draw(st.floats(0.001, 0.3))
    extra = np.asarray(draw(st.lists(st.floats(0.0, 0.1), min_size=n, max_size=n)), dtype=np.float64)
    uneven = draw(st.booleans())
    return now, arrivals, arrivals + slo + (extra if uneven else 0.0)


# ------------------------------------------------------------------------------ Clockwork
@settings(max_examples=300, deadline=None)
@given(q=queues(), exec_ms=exec_models, max_batch=st.integers(1, 16), drop_late=st.booleans())
def test_clockwork_decision_meets_every_deadline_and_is_largest(q, exec_ms, max_batch, drop_late):
    now, arrivals, deadlines = q
    d = ClockworkBatcher(max_batch, drop_late=drop_late).decide(now, arrivals, deadlines, exec_ms)
    late = finish_time(now, exec_ms(1)) > deadlines
    if drop_late:
        assert d.drop == tuple(np.flatnonzero(late)) and (d.reason == LATE) == bool(d.drop)
        keep = ~late
    else:
        assert d.drop == ()
        keep = np.ones(deadlines.size, dtype=bool)
    dl, lt = deadlines[keep], late[keep]
    assert 0 <= d.start <= max_batch and d.start <= dl.size
    assert (d.start > 0) == (dl.size > 0), "work-conserving: a waiting request always starts"
    assert d.wake_at is None

    def feasible(b):
        members = dl[:b][~lt[:b]]
        return bool(np.all(finish_time(now, exec_ms(b)) <= members))

    if d.start:
        assert feasible(d.start), "a started batch must not make an on-time member miss"
    for b in range(d.start + 1, min(max_batch, dl.size) + 1):
        assert not feasible(b), f"batch of {b} was feasible but {d.start} chosen"


@settings(max_examples=100, deadline=None)
@given(gaps=st.lists(st.floats(0.0, 0.05), min_size=1, max_size=120), exec_ms=exec_models,
       slo_ms=st.floats(1.0, 300.0), max_batch=st.integers(1, 16), drop_late=st.booleans())
def test_clockwork_served_requests_meet_deadlines(gaps, exec_ms, slo_ms, max_batch, drop_late):
    arrivals = np.cumsum(gaps)
    r = run_queue(arrivals, slo_ms, ClockworkBatcher(max_batch, drop_late=drop_late), exec_ms)
    _check_schedule(r, max_batch)
    served = ~r.dropped
    if drop_late:
        assert np.all(r.finish[served] <= r.deadline[served])
        assert set(r.reason[r.dropped]) <= {LATE}
    else:
        assert not r.dropped.any()
        # A request that could still make it alone when its batch started did make it.
        could = np.array([finish_time(s, exec_ms(1)) <= dl for s, dl in zip(r.start, r.deadline)])
        assert np.all(r.finish[could] <= r.deadline[could])


def _check_schedule(r, max_batch):
    """One worker, batches back to back, never over max_batch, nobody served before arriving."""
    served = ~r.dropped
    assert np.all(r.batch_size <= max_batch) and np.all(r.batch_size >= 1)
    assert r.batch_size.sum() == served.sum()
    np.testing.assert_array_equal(np.bincount(r.batch[served], minlength=r.batch_size.size), r.batch_size)
    assert np.all(r.start[served] >= r.arrival[served])
    starts = np.array([r.start[r.batch == k][0] for k in range(r.batch_size.size)])
    ends = np.array([r.finish[r.batch == k][0] for k in range(r.batch_size.size)])
    assert np.all(starts[1:] >= ends[:-1])
    assert np.all(np.isnan(r.start[r.dropped]))


def test_clockwork_hand_case():
    exec_ms = linear(10.0, 5.0)  # 15 ms alone, 50 ms for 8
    arrivals = np.zeros(10)
    b = ClockworkBatcher(max_batch=8)
    assert b.decide(0.0, arrivals, arrivals + 0.1, exec_ms) == Decision(start=8)
    # With 40 ms of slack only 10 + 5b <= 40 fits: b = 6.
    assert b.decide(0.0, arrivals, arrivals + 0.04, exec_ms).start == 6
    # At t = 0.09 nobody can finish by 0.1 any more (needs 15 ms): all dropped.
    d = b.decide(0.09, arrivals, arrivals + 0.1, exec_ms)
    assert d == Decision(start=0, drop=tuple(range(10)), reason=LATE)
    r = run_queue(arrivals, 100.0, b, exec_ms)
    np.testing.assert_array_equal(r.batch_size, [8, 2])
    np.testing.assert_allclose(r.finish, [0.05] * 8 + [0.07] * 2)
    assert r.met_slo.all()


def test_clockwork_head_late_later_ones_served():
    exec_ms = linear(10.0, 0.0)
    arrivals = np.array([0.0, 0.05, 0.06])
    d = ClockworkBatcher(4).decide(0.095, arrivals, arrivals + 0.1, exec_ms)
    assert d == Decision(start=2, drop=(0,), reason=LATE)
    keep = ClockworkBatcher(4, drop_late=False).decide(0.095, arrivals, arrivals + 0.1, exec_ms)
    assert keep == Decision(start=3)  # the late head rides along; the others still meet 0.15


def test_clockwork_no_drop_serves_late_head_alone_when_needed():
    exec_ms = linear(10.0, 10.0)  # 20 ms alone, 30 ms for two
    arrivals = np.array([0.0, 0.08])
    # Head is late anyway; with the second request (deadline 0.18) a batch of 2 from 0.149 ends at 0.179: ok.
    assert ClockworkBatcher(4, drop_late=False).decide(0.149, arrivals, arrivals + 0.1, exec_ms).start == 2
    # At 0.16 a batch of 2 would end at 0.19 and make the on-time one late: serve the head alone.
    assert ClockworkBatcher(4, drop_late=False).decide(0.16, arrivals, arrivals + 0.1, exec_ms).start == 1


# ------------------------------------------------------------------------------ TF Serving
def test_tf_serving_waits_for_timeout_then_runs_partial_batch():
    b = TFServingBatcher(max_batch=4, batch_timeout_ms=60.0, max_enqueued_batches=2)
    arrivals = np.array([0.0, 0.01])
    d = b.decide(0.02, arrivals, arrivals + 1, linear(5, 1))
    assert d.start == 0 and d.wake_at == pytest.approx(0.06)
    assert b.decide(d.wake_at, arrivals, arrivals + 1, linear(5, 1)).start == 2
    r = run_queue([0.0, 0.01], 1000.0, b, linear(5, 1))
    np.testing.assert_allclose(r.start, [0.06, 0.06])


def test_tf_serving_full_batch_starts_at_once():
    b = TFServingBatcher(max_batch=4, batch_timeout_ms=60.0, max_enqueued_batches=2)
    arrivals = np.array([0.0, 0.001, 0.002, 0.003, 0.004])
    assert b.decide(0.004, arrivals, arrivals + 1, linear(5, 1)) == Decision(start=4)


def test_tf_serving_rejects_when_enqueued_batches_full():
    b = TFServingBatcher(max_batch=2, batch_timeout_ms=60.0, max_enqueued_batches=2)
    r = run_queue(np.zeros(7), 1000.0, b, linear(10, 0))
    np.testing.assert_array_equal(r.dropped, [False] * 4 + [True] * 3)
    assert set(r.reason[r.dropped]) == {QUEUE_FULL}
    np.testing.assert_array_equal(r.batch_size, [2, 2])
    # Batches closed by their timeout count as whole batches: two singletons fill the queue.
    # (0.0 closes at 0.06; 0.1 opens a second batch closing at 0.16; later ones find both waiting.)
    arrivals = np.array([0.0, 0.1, 0.17, 0.18])
    d = b.decide(0.18, arrivals, arrivals + 1, linear(10, 0))
    assert d == Decision(start=1, drop=(2, 3), reason=QUEUE_FULL)


def _tf_reference(arrivals, max_batch, timeout_ms, max_enq, exec_ms):
    """TF Serving's scheduler simulated forward in time: batches form at arrival, one worker."""
    timeout = timeout_ms * 1e-3
    batches = []  # [members, closes_at, start]
    worker_free = -np.inf
    start = np.full(arrivals.size, np.nan)

    def run_until(t):
        nonlocal worker_free
        for bt in batches:
            if bt[2] is not None:
                continue
            full_at = arrivals[bt[0][-1]] if len(bt[0]) == max_batch else np.inf
            closed = min(full_at, bt[1])
            if not closed < t:
                return
            s = max(worker_free, closed)
            if not s < t:
                return
            bt[2] = s
            start[bt[0]] = s
            worker_free = finish_time(s, exec_ms(len(bt[0])))

    for i, a in enumerate(arrivals):
        run_until(a)
        waiting = [bt for bt in batches if bt[2] is None]
        last = waiting[-1] if waiting else None
        if last is not None and len(last[0]) < max_batch and a < last[1]:
            last[0].append(i)
        elif len(waiting) < max_enq:
            batches.append([[i], a + timeout, None])
    run_until(np.inf)
    return start


@pytest.mark.parametrize("seed", range(20))
def test_tf_serving_matches_forward_simulation(seed):
    rng = np.random.default_rng(seed)
    max_batch, max_enq = int(rng.integers(1, 9)), int(rng.integers(1, 4))
    timeout_ms = float(rng.uniform(0, 80))
    arrivals = np.cumsum(rng.exponential(rng.uniform(0.0005, 0.02), 300))
    exec_ms = linear(rng.uniform(1, 10), rng.uniform(0, 5))
    r = run_queue(arrivals, 1000.0, TFServingBatcher(max_batch, timeout_ms, max_enq), exec_ms)
    ref = _tf_reference(arrivals, max_batch, timeout_ms, max_enq, exec_ms)
    np.testing.assert_array_equal(r.dropped, np.isnan(ref))
    np.testing.assert_allclose(r.start[~r.dropped], ref[~r.dropped], rtol=0, atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(gaps=st.lists(st.floats(0.0, 0.05), min_size=1, max_size=120), exec_ms=exec_models,
       max_batch=st.integers(1, 16), timeout_ms=st.floats(0.0, 100.0), max_enq=st.integers(1, 4))
def test_tf_serving_schedule_properties(gaps, exec_ms, max_batch, timeout_ms, max_enq):
    arrivals = np.cumsum(gaps)
    r = run_queue(arrivals, 50.0, TFServingBatcher(max_batch, timeout_ms, max_enq), exec_ms)
    _check_schedule(r, max_batch)
    assert set(r.reason[r.dropped]) <= {QUEUE_FULL}
    for k, size in enumerate(r.batch_size):
        members = np.flatnonzero(r.batch == k)
        head_waited = r.start[members[0]] >= r.arrival[members[0]] + timeout_ms * 1e-3
        assert size == max_batch or head_waited, "a partial batch started before its timeout"


# ------------------------------------------------------------------------------ both
@pytest.mark.parametrize("batcher", [ClockworkBatcher(4), ClockworkBatcher(4, drop_late=False),
                                     TFServingBatcher(4, 20.0, 2)])
def test_deterministic_and_fifo(batcher):
    arrivals = np.cumsum(np.random.default_rng(0).exponential(0.004, 500))
    a = run_queue(arrivals, 40.0, batcher, linear(5, 2))
    b = run_queue(arrivals, 40.0, batcher, linear(5, 2))
    for field in ("start", "finish", "dropped", "batch", "batch_size"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    served = ~a.dropped
    assert np.all(np.diff(a.batch[served]) >= 0), "requests are served in arrival order"
    _check_schedule(a, 4)


def test_empty_queue_and_trace():
    for batcher in (ClockworkBatcher(2), TFServingBatcher(2, 10.0, 1)):
        assert batcher.decide(1.0, np.array([]), np.array([]), linear(1, 1)) == Decision()
        r = run_queue([], 10.0, batcher, linear(1, 1))
        assert r.batch_size.size == 0 and r.start.size == 0


@pytest.mark.parametrize("make", [lambda: ClockworkBatcher(0), lambda: TFServingBatcher(0, 1.0, 1),
                                  lambda: TFServingBatcher(2, -1.0, 1), lambda: TFServingBatcher(2, 1.0, 0)])
def test_bad_settings(make):
    with pytest.raises(ValueError):
        make()


def test_bad_exec_model_and_unsorted_arrivals():
    with pytest.raises(ValueError, match="exec_ms"):
        ClockworkBatcher(2).decide(0.0, np.zeros(1), np.ones(1), lambda b: float("nan"))
    with pytest.raises(ValueError, match="sorted"):
        run_queue([1.0, 0.0], 10.0, ClockworkBatcher(2), linear(1, 1))
