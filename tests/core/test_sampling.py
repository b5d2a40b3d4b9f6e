"""The feedback pool (core/sampling.py): inputs that left their batch wait, oldest first, to run
again; nothing is lost or duplicated, and an input becomes overdue after `max_age` inputs served."""

import pytest
from hypothesis import given, settings, strategies as st

from apparate.core.sampling import FeedbackPool


def test_the_pool_keeps_its_cap_order_and_age():
    pool = FeedbackPool(cap=3, max_age=10)
    pool.add(["a", "b"])
    assert pool.room == 1 and len(pool) == 2
    with pytest.raises(ValueError):
        pool.add(["c", "d"])  # more than its room: refused whole
    pool.served += 5
    pool.add(["c"])
    assert not pool.overdue()
    pool.served += 5  # "a" and "b" joined 10 inputs ago
    assert pool.overdue()
    taken = pool.take(2)
    assert [it for _, it in taken] == ["a", "b"]
    assert not pool.overdue()  # "c" joined 5 ago
    pool.put_back(taken)  # abandoned: back at the front, with their age
    assert pool.overdue() and pool.counts["abandoned"] == 1
    assert [it for _, it in pool.take(3)] == ["a", "b", "c"]
    with pytest.raises(ValueError):
        FeedbackPool(cap=-1, max_age=10)


def test_take_groups_inputs_that_can_run_together_and_leaves_the_rest_in_order():
    pool = FeedbackPool(cap=8, max_age=100)
    pool.add([("x", 1), ("y", 2), ("x", 3), ("y", 4), ("x", 5)])
    same = lambda a, b: a[0] == b[0]  # noqa: E731
    assert [it for _, it in pool.take(2, same)] == [("x", 1), ("x", 3)]
    assert [it for _, it in pool.take(8, same)] == [("y", 2), ("y", 4)]
    assert [it for _, it in pool.take(8, same)] == [("x", 5)]
    assert len(pool) == 0 and pool.take(4) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "take", "back", "serve"]), st.integers(1, 4)), max_size=60))
def test_nothing_is_lost_or_duplicated_and_the_oldest_comes_first(ops):
    pool = FeedbackPool(cap=6, max_age=5)
    model: list[int] = []  # what the pool should hold, oldest first
    done: list[int] = []
    held: list = []
    nxt = 0
    for op, k in ops:
        if op == "add":  # a batch served: the pooled run before it has ended
            done += [it for _, it in held]
            held = []
            k = min(k, pool.room)
            pool.add(list(range(nxt, nxt + k)))
            model += list(range(nxt, nxt + k))
            nxt += k
        elif op == "take":
            if held:  # the previous run completed
                done += [it for _, it in held]
            held = pool.take(k)
            assert [it for _, it in held] == model[:k]
            model = model[len(held):]
        elif op == "back" and held:
            pool.put_back(held)
            model = [it for _, it in held] + model
            held = []
        else:
            pool.served += k
        assert len(pool) == len(model) <= pool.cap
    done += [it for _, it in held] + [it for _, it in pool.take(pool.cap)]
    assert sorted(done) == list(range(nxt)) == done  # each once, in the order they joined
