"""Arrival traces: requested rates, seeding, rescaling, and clear errors on bad files."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apparate.zoo import traces as T

REPO = Path(__file__).resolve().parents[2]


def _data_dir() -> Path | None:
    for c in (os.environ.get("APPARATE_DATA"), REPO.parent / "shared" / "data"):
        if c and (Path(c) / T.AZURE_LLM_FILE).is_file():
            return Path(c)
    return None


def _sorted_nonneg(tr: T.Trace) -> bool:
    t = np.asarray(tr)
    return t.dtype == np.float64 and bool(np.all(t >= 0) and np.all(np.diff(t) >= 0))


# ------------------------------------------------------------------------------ synthetic
def test_fixed_rate_is_exact():
    tr = T.fixed_rate(30, n=90)
    assert len(tr) == 90 and tr.times[0] == 0.0
    np.testing.assert_allclose(np.diff(tr.times), 1 / 30)
    assert tr.rate == pytest.approx(30)
    by_time = T.fixed_rate(30, duration=10)
    assert len(by_time) == 300 and by_time.duration < 10
    assert len(T.fixed_rate(30, n=5, duration=10)) == 5


@settings(max_examples=25, deadline=None)
@given(rate=st.floats(0.5, 5000), seed=st.integers(0, 2**31), cv=st.sampled_from([None, 0.5, 1.0, 2.0]))
def test_random_traces_have_requested_rate(rate, seed, cv):
    n = 4000
    tr = T.poisson(rate, n=n, seed=seed) if cv is None else T.bursty(rate, cv, n=n, seed=seed)
    assert len(tr) == n and _sorted_nonneg(tr)
    # Mean of n i.i.d. gaps: relative standard error cv / sqrt(n); allow 5 sigma.
    gaps = np.diff(np.concatenate([[0.0], tr.times]))
    assert abs(gaps.mean() * rate - 1) < 5 * (cv or 1.0) / math.sqrt(n)


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0])
def test_bursty_gaps_have_requested_cv(cv):
    tr = T.bursty(100, cv, n=50_000, seed=1)
    gaps = np.diff(tr.times)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)


@pytest.mark.parametrize("make", [lambda **k: T.poisson(200, **k), lambda **k: T.bursty(200, 3.0, **k)])
def test_duration_gives_expected_count(make):
    tr = make(duration=60.0, seed=3)
    assert _sorted_nonneg(tr) and tr.duration < 60.0
    expected = 200 * 60
    assert abs(len(tr) - expected) < 6 * 3.0 * math.sqrt(expected)
    assert len(make(duration=60.0, n=100, seed=3)) == 100


def test_seeding_is_deterministic():
    a, b = T.poisson(50, n=1000, seed=7), T.poisson(50, n=1000, seed=7)
    np.testing.assert_array_equal(a.times, b.times)
    assert not np.array_equal(a.times, T.poisson(50, n=1000, seed=8).times)
    g1, g2 = np.random.default_rng(5), np.random.default_rng(5)
    np.testing.assert_array_equal(T.bursty(50, 2, n=100, seed=g1).times, T.bursty(50, 2, n=100, seed=g2).times)


@pytest.mark.parametrize("call", [
    lambda: T.poisson(0, n=10), lambda: T.poisson(-1, n=10), lambda: T.poisson(10),
    lambda: T.bursty(10, 0, n=10), lambda: T.fixed_rate(float("nan"), n=3), lambda: T.poisson(10, n=-1),
])
def test_bad_generator_arguments(call):
    with pytest.raises(ValueError):
        call()


# ------------------------------------------------------------------------------ edits
@settings(max_examples=50, deadline=None)
@given(gaps=st.lists(st.floats(0, 1e3, allow_subnormal=False), min_size=2, max_size=200),
       offset=st.floats(0, 1e3, allow_subnormal=False),
       rate=st.floats(1e-3, 1e5))
def test_rescale_hits_target_rate_and_keeps_shape(gaps, offset, rate):
    times = offset + np.cumsum(gaps)
    if not times[-1] > times[0]:
        with pytest.raises(ValueError):
            T.rescale(times, rate)
        return
    out = T.rescale(times, rate)
    assert _sorted_nonneg(out)
    # Exact up to rounding, which grows when the span is tiny next to the times themselves.
    eps = 8 * np.finfo(float).eps * times[-1] / (times[-1] - times[0])
    assert out.rate == pytest.approx(rate, rel=1e-12 + eps)
    np.testing.assert_allclose(out.times * (times[-1] / out.times[-1]), times, rtol=1e-12, atol=1e-12 * times[-1])


def test_truncate_and_take_first():
    tr = T.fixed_rate(10, n=100)
    assert len(T.truncate(tr, 2.0)) == 20 and T.truncate(tr, 2.0).duration < 2.0
    assert len(T.take_first(tr, 7)) == 7 and len(T.take_first(tr, 1000)) == 100
    assert T.take_first(tr, 3).name == tr.name
    np.testing.assert_array_equal(np.asarray(T.take_first(np.array([0.0, 1.0, 2.0]), 2)), [0.0, 1.0])


def test_trace_rejects_bad_times():
    for bad in ([1.0, 0.5], [-1.0, 2.0], [0.0, float("nan")]):
        with pytest.raises(ValueError, match="arrival"):
            T.Trace(np.array(bad))
    assert not np.asarray(T.fixed_rate(1, n=3)).flags.writeable


# ------------------------------------------------------------------------------ Azure LLM
@pytest.mark.skipif(_data_dir() is None, reason="no data dir with traces/azure_llm_2023_conv.csv")
def test_azure_llm_trace_loads():
    tr = T.azure_llm(data_dir=_data_dir())
    assert len(tr) == 19_366 and _sorted_nonneg(tr)
    assert tr.times[0] == 0.0 and 3400 < tr.duration < 3600
    assert tr.times[1] == pytest.approx(50.9951690 - 46.6805900, abs=1e-9)  # first two rows of the file
    assert 5 < tr.rate < 6
    fast = T.generate("azure-llm", rate=100, n=500, data_dir=_data_dir())
    assert len(fast) == 500 and _sorted_nonneg(fast)
    assert T.rescale(tr, 100).rate == pytest.approx(100)


# ------------------------------------------------------------------------------ CSV files
def _write(tmp_path: Path, text: str, name: str = "trace.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_csv_round_trip_and_formats(tmp_path):
    tr = T.poisson(10, n=50, seed=0)
    back = T.read_csv(T.write_csv(tr, tmp_path / "t.csv"))
    np.testing.assert_array_equal(back.times, tr.times)
    plain = T.read_csv(_write(tmp_path, "0\n0.5\n2\n"))  # no header
    np.testing.assert_array_equal(plain.times, [0, 0.5, 2])
    dated = T.read_csv(_write(tmp_path, "id,TIMESTAMP\n1,2023-11-16T23:59:59.999999999\n2,2023-11-17 00:00:01.5\n"))
    np.testing.assert_allclose(dated.times, [0.0, 1.500000001])
    picked = T.read_csv(_write(tmp_path, "a,b\n5,0\n1,1\n"), column="b")
    np.testing.assert_array_equal(picked.times, [0, 1])


@pytest.mark.parametrize("text,match", [
    ("arrival_s\n0\n2\n1\n", r"line 4: .*earlier"),
    ("arrival_s\n0\n-1\n", r"line 3: negative"),
    ("arrival_s\n0\nnan\n", r"line 3: .*not a finite"),
    ("arrival_s\n0\n\n1\nabc\n", r"line 5: 'abc' is not a time"),
    ("TIMESTAMP\n2023-11-16 18:15:46.68\n2023-11-16 18:15:40.00\n", r"line 3: .*earlier"),
    ("TIMESTAMP\n2023-11-16 18:15:46.68\n2023-13-16 18:15:47\n", r"line 3: .*not a date-time"),
    ("TIMESTAMP\n2023-11-16 18:15:46.68\nNaT\n", r"line 3: .*not a date-time"),
    ("x,arrival_s\n1,0\n2,\n", r"line 3: missing time"),
    ("", r"empty"),
    ("arrival_s\n", r"no arrivals"),
])
def test_bad_trace_files_fail_clearly(tmp_path, text, match):
    path = _write(tmp_path, text, "bad_trace.csv")
    with pytest.raises(ValueError, match=match) as err:
        T.read_csv(path)
    assert "bad_trace.csv" in str(err.value)


def test_missing_column_named(tmp_path):
    with pytest.raises(ValueError, match="no column 'when'"):
        T.read_csv(_write(tmp_path, "a\n1\n"), column="when")


# ------------------------------------------------------------------------------ Azure Functions
def _functions_file(tmp_path: Path, rows: list[list[int]], name="invocations.csv") -> Path:
    m = len(rows[0])
    lines = ["HashOwner,HashApp,HashFunction,Trigger," + ",".join(str(i) for i in range(1, m + 1))]
    for k, counts in enumerate(rows):
        lines.append(f"o{k},a{k},f{k},http," + ",".join(map(str, counts)))
    return _write(tmp_path, "\n".join(lines) + "\n", name)


def test_azure_functions_expands_counts_per_minute(tmp_path):
    rows = [[3, 0, 5, 1], [0, 2, 0, 0], [1, 1, 1, 1]]
    path = _functions_file(tmp_path, rows)
    everything = T.azure_functions(path, seed=0)
    assert len(everything) == 15 and _sorted_nonneg(everything)
    per_minute = np.histogram(everything.times, bins=np.arange(5) * 60.0)[0]
    np.testing.assert_array_equal(per_minute, np.sum(rows, axis=0))
    one = T.azure_functions(path, functions=0, seed=0)
    np.testing.assert_array_equal(np.histogram(one.times, bins=np.arange(5) * 60.0)[0], rows[0])
    pair = T.azure_functions(path, functions=["f1", 2], seed=0)
    np.testing.assert_array_equal(np.histogram(pair.times, bins=np.arange(5) * 60.0)[0], [1, 3, 1, 1])
    np.testing.assert_array_equal(T.azure_functions(path, seed=4).times, T.azure_functions(path, seed=4).times)
    assert not np.array_equal(T.azure_functions(path, seed=4).times, T.azure_functions(path, seed=5).times)


def test_azure_functions_errors(tmp_path):
    good = _functions_file(tmp_path, [[1, 2], [0, 1]])
    with pytest.raises(ValueError, match="no function"):
        T.azure_functions(good, functions=["nope"])
    with pytest.raises(ValueError, match="no invocations"):
        T.azure_functions(_functions_file(tmp_path, [[0, 0]], "zero.csv"))
    bad = _write(tmp_path, "HashOwner,HashApp,HashFunction,Trigger,1,2\no,a,f,http,1,-2\n", "neg.csv")
    with pytest.raises(ValueError, match=r"neg.csv, line 2, minute 2"):
        T.azure_functions(bad)
    bad = _write(tmp_path, "HashOwner,HashApp,HashFunction,Trigger,1,2\no,a,f,http,1,x\n", "nan.csv")
    with pytest.raises(ValueError, match=r"line 2: count 'x'"):
        T.azure_functions(bad)
    with pytest.raises(ValueError, match=r"hdr.csv, line 1: expected header"):
        T.azure_functions(_write(tmp_path, "a,b,c\n1,2,3\n", "hdr.csv"))


def test_generate_by_kind():
    assert T.generate("fixed", 30, n=10).rate == pytest.approx(30)
    assert len(T.generate("poisson", 30, duration=2, seed=1)) > 0
    assert len(T.generate("bursty", 30, n=10, cv=2)) == 10
    with pytest.raises(ValueError, match="unknown trace kind"):
        T.generate("nope", 1, n=1)
