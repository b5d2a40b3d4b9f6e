"""Arrival traces: when requests reach the server.

A trace is a sorted float64 array of arrival times in seconds, starting near 0, wrapped in a
small `Trace` that also carries a name and metadata for reports (`np.asarray(trace)` gives the
array). Synthetic traces (fixed rate, Poisson, bursty gamma) are generated vectorised from a
seeded numpy Generator; real ones come from files: the Azure LLM inference trace 2023 and the
Azure Functions 2019 per-minute invocation counts. Any trace can be rescaled to a target mean
rate with its shape kept, which is how a real trace drives a model of any speed.

The mean rate of a trace is (n - 1) / (last - first): the inverse of the mean gap between
arrivals. It depends only on the arrivals themselves, so `rescale` hits it exactly.

Files are validated row by row: unsorted, negative, NaN or missing times and empty files raise
`ValueError` naming the file and line, because a silently re-sorted trace is a different
workload.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from apparate.paths import data_dir as resolve_data_dir

AZURE_LLM_FILE = Path("traces") / "azure_llm_2023_conv.csv"
# Column names tried, in order, when a CSV trace does not say which column holds the times.
TIME_COLUMNS = ("TIMESTAMP", "timestamp", "time", "arrival", "arrival_s", "t")
FUNCTION_ID_COLUMNS = ("HashOwner", "HashApp", "HashFunction", "Trigger")

Seed = int | np.random.Generator | None


@dataclass(frozen=True, eq=False)
class Trace:
    """Arrival times in seconds (sorted, finite, non-negative), a name and free-form metadata."""

    times: np.ndarray
    name: str = "trace"
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        times = np.array(self.times, dtype=np.float64).reshape(-1)
        _check_times(times, self.name)
        times.flags.writeable = False
        object.__setattr__(self, "times", times)
        object.__setattr__(self, "meta", dict(self.meta))

    def __len__(self) -> int:
        return int(self.times.size)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self.times if dtype is None else self.times.astype(dtype)
        return out.copy() if copy else out

    @property
    def duration(self) -> float:
        """Time of the last arrival (0 for an empty trace)."""
        return float(self.times[-1]) if self.times.size else 0.0

    @property
    def rate(self) -> float:
        """Mean arrival rate in requests per second; see `mean_rate`."""
        return mean_rate(self)

    def __repr__(self) -> str:
        rate = f"{self.rate:.4g}/s" if len(self) >= 2 and self.times[-1] > self.times[0] else "n/a"
        return f"Trace({self.name!r}, n={len(self)}, duration={self.duration:.4g}s, rate={rate})"


TraceLike = Trace | np.ndarray | Sequence[float]


def _as_trace(trace: TraceLike) -> Trace:
    return trace if isinstance(trace, Trace) else Trace(np.asarray(trace, dtype=np.float64))


def _check_times(times: np.ndarray, source: str) -> None:
    """Raise ValueError at the first NaN, negative or out-of-order arrival."""
    bad = np.flatnonzero(~np.isfinite(times))
    if bad.size:
        raise ValueError(f"{source}: arrival {bad[0]} is {times[bad[0]]}, not a finite time")
    bad = np.flatnonzero(times < 0)
    if bad.size:
        raise ValueError(f"{source}: arrival {bad[0]} is negative ({times[bad[0]]} s)")
    bad = np.flatnonzero(np.diff(times) < 0)
    if bad.size:
        i = bad[0] + 1
        raise ValueError(f"{source}: arrival {i} ({times[i]} s) is earlier than arrival {i - 1} "
                         f"({times[i - 1]} s); a trace must be sorted")


# ---------------------------------------------------------------------------------- rates, edits
def mean_rate(trace: TraceLike) -> float:
    """Requests per second: (n - 1) / (last - first), the inverse of the mean gap."""
    t = np.asarray(trace, dtype=np.float64)
    if t.size < 2 or not t[-1] > t[0]:
        raise ValueError(f"a mean rate needs two arrivals at different times, got {t.size} arrivals")
    return float((t.size - 1) / (t[-1] - t[0]))


def rescale(trace: TraceLike, rate: float) -> Trace:
    """The same trace with every time multiplied so that its mean rate is exactly `rate`.

    Scaling about time 0 keeps the shape (bursts, diurnal swings, gaps) and non-negativity.
    """
    _check_rate(rate)
    tr = _as_trace(trace)
    factor = mean_rate(tr) / rate
    meta = {**tr.meta, "rescaled_from_rate": mean_rate(tr), "rate": float(rate)}
    return Trace(tr.times * factor, name=tr.name, meta=meta)


def truncate(trace: TraceLike, duration: float) -> Trace:
    """Only the arrivals before `duration` seconds."""
    tr = _as_trace(trace)
    if not duration >= 0:
        raise ValueError(f"duration must be non-negative, got {duration}")
    n = int(np.searchsorted(tr.times, duration, side="left"))
    return Trace(tr.times[:n], name=tr.name, meta=tr.meta)


def take_first(trace: TraceLike, n: int) -> Trace:
    """Only the first n arrivals (all of them if the trace is shorter)."""
    tr = _as_trace(trace)
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    return Trace(tr.times[:n], name=tr.name, meta=tr.meta)


# ---------------------------------------------------------------------------------- synthetic
def _check_rate(rate: float) -> None:
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be a positive number of requests per second, got {rate}")


def _check_size(n: int | None, duration: float | None) -> None:
    if n is None and duration is None:
        raise ValueError("give n (number of arrivals) or duration (seconds), or both")
    if n is not None and n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if duration is not None and not (duration >= 0 and math.isfinite(duration)):
        raise ValueError(f"duration must be a non-negative number of seconds, got {duration}")


def _renewal(draw_gaps, rate: float, spread: float, n: int | None, duration: float | None) -> np.ndarray:
    """Cumulative sums of i.i.d. gaps (mean 1/rate), stopping at n arrivals or at `duration`.

    With a duration, gaps are drawn in chunks sized to cover it with high probability, so the
    usual case is one vectorised draw; `spread` is the gaps' coefficient of variation.
    """
    if duration is None:
        return np.cumsum(draw_gaps(n))
    expected = rate * duration
    want = expected + 8.0 * max(spread, 1.0) * math.sqrt(expected) + 16
    if n is not None:
        want = min(want, n)
    chunks, last = [], 0.0
    while True:
        times = last + np.cumsum(draw_gaps(max(int(want), 1)))
        chunks.append(times)
        last = float(times[-1])
        drawn = sum(c.size for c in chunks)
        if last >= duration or (n is not None and drawn >= n):
            break
    times = np.concatenate(chunks)
    times = times[: np.searchsorted(times, duration, side="left")]
    return times if n is None else times[:n]


def fixed_rate(rate: float, n: int | None = None, duration: float | None = None,
               start: float = 0.0) -> Trace:
    """Evenly spaced arrivals, e.g. a 30 fps camera: start, start + 1/rate, ..."""
    _check_rate(rate)
    _check_size(n, duration)
    count = n if duration is None else max(0, math.ceil((duration - start) * rate))
    if n is not None:
        count = min(count, n)
    times = start + np.arange(count, dtype=np.float64) / rate
    if duration is not None:
        times = times[times < duration]
    return Trace(times, name=f"fixed({rate:g}/s)", meta={"kind": "fixed", "rate": float(rate)})


def poisson(rate: float, n: int | None = None, duration: float | None = None, seed: Seed = 0) -> Trace:
    """A Poisson process: independent exponential gaps with mean 1/rate."""
    _check_rate(rate)
    _check_size(n, duration)
    rng = np.random.default_rng(seed)
    times = _renewal(lambda k: rng.exponential(1.0 / rate, k), rate, 1.0, n, duration)
    return Trace(times, name=f"poisson({rate:g}/s)", meta={"kind": "poisson", "rate": float(rate)})


def bursty(rate: float, cv: float, n: int | None = None, duration: float | None = None,
           seed: Seed = 0) -> Trace:
    """Gamma-distributed gaps with mean 1/rate and coefficient of variation `cv`.

    cv = 1 is Poisson; larger cv means burstier (clusters of near-simultaneous requests separated
    by long lulls); smaller is more regular. Shape k = 1/cv^2, scale = 1/(rate k).
    """
    _check_rate(rate)
    _check_size(n, duration)
    if not (cv > 0 and math.isfinite(cv)):
        raise ValueError(f"cv must be positive, got {cv}")
    rng = np.random.default_rng(seed)
    shape = 1.0 / cv**2
    scale = 1.0 / (rate * shape)
    times = _renewal(lambda k: rng.gamma(shape, scale, k), rate, cv, n, duration)
    return Trace(times, name=f"bursty({rate:g}/s,cv={cv:g})",
                 meta={"kind": "bursty", "rate": float(rate), "cv": float(cv)})


# ---------------------------------------------------------------------------------- files
def _parse_times(values: list[str], lines: list[int], where: str) -> tuple[np.ndarray, bool]:
    """Seconds from numbers or date-times (then relative to the first); (times, were_dates)."""
    try:
        float(values[0])
        numeric = True
    except ValueError:
        numeric = False
    if numeric:
        try:
            return np.array(values, dtype=np.float64), False
        except ValueError:
            for v, line in zip(values, lines):
                try:
                    float(v)
                except ValueError:
                    raise ValueError(f"{where}, line {line}: {v!r} is not a time in seconds") from None
            raise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy warns about (and ignores) time zone suffixes
        try:
            stamps = np.array(values, dtype="datetime64[ns]")
        except ValueError:
            stamps = None
        if stamps is None or np.isnat(stamps).any():
            for v, line in zip(values, lines):
                try:
                    ok = v.strip() != "" and not np.isnat(np.datetime64(v, "ns"))
                except ValueError:
                    ok = False
                if not ok:
                    raise ValueError(f"{where}, line {line}: {v!r} is not a date-time "
                                     "(expected e.g. 2023-11-16 18:15:46.6805900)") from None
            raise ValueError(f"{where}: could not parse the time column")
    ns = stamps.astype(np.int64)
    return (ns - ns[0]).astype(np.float64) * 1e-9, True


def _check_file_times(times: np.ndarray, lines: list[int], where: str, dated: bool) -> None:
    bad = np.flatnonzero(~np.isfinite(times))
    if bad.size:
        raise ValueError(f"{where}, line {lines[bad[0]]}: time is {times[bad[0]]}, not a finite number")
    # Date-times are relative to the first, so a negative one is an out-of-order one.
    bad = np.flatnonzero(times < 0) if not dated else bad
    if bad.size:
        raise ValueError(f"{where}, line {lines[bad[0]]}: negative time {times[bad[0]]}")
    bad = np.flatnonzero(np.diff(times) < 0)
    if bad.size:
        i = bad[0] + 1
        raise ValueError(f"{where}, line {lines[i]}: time {times[i]} s is earlier than the previous "
                         f"arrival's {times[i - 1]} s (line {lines[i - 1]}); traces must be sorted")


def read_csv(path: str | os.PathLike, column: str | None = None, name: str | None = None) -> Trace:
    """A trace from a CSV file with one arrival per row.

    The time column is `column`, else the first of TIME_COLUMNS present, else the first column;
    a header row is expected unless the first cell is already a number. Times are seconds, or
    date-times (ISO-like, any number of fractional digits), which are made relative to the first.
    """
    path = Path(path)
    where = str(path)
    with open(path, newline="") as f:
        reader = csv.reader(f)
        rows = [(reader.line_num, r) for r in reader if r and any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{where}: empty trace file (no header and no arrivals)")
    header = [c.strip() for c in rows[0][1]]
    try:
        float(header[0])
        header_row = False
    except ValueError:
        header_row = True
    if header_row:
        if column is not None:
            if column not in header:
                raise ValueError(f"{where}, line {rows[0][0]}: no column {column!r} in header {header}")
            col = header.index(column)
        else:
            col = next((header.index(c) for c in TIME_COLUMNS if c in header), 0)
        rows = rows[1:]
    else:
        if column is not None:
            raise ValueError(f"{where}: column {column!r} asked for but the file has no header row")
        col = 0
    if not rows:
        raise ValueError(f"{where}: no arrivals (the file has only a header)")
    lines, values = [], []
    for line, r in rows:
        if col >= len(r) or not r[col].strip():
            raise ValueError(f"{where}, line {line}: missing time")
        lines.append(line)
        values.append(r[col].strip())
    times, dated = _parse_times(values, lines, where)
    _check_file_times(times, lines, where, dated)
    return Trace(times, name=name or path.stem,
                 meta={"kind": "file", "path": where, "dated": dated})


def write_csv(trace: TraceLike, path: str | os.PathLike) -> Path:
    """Write arrival times (seconds) one per row under an `arrival_s` header; `read_csv` reads it."""
    path = Path(path)
    t = np.asarray(trace, dtype=np.float64)
    with open(path, "w", newline="") as f:
        f.write("arrival_s\n")
        for v in t.tolist():
            f.write(f"{v!r}\n")
    return path


def azure_llm(path: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None) -> Trace:
    """The Azure LLM inference trace 2023 (conversation): ~19,366 real arrivals over ~1 hour.

    Times are seconds from the first request (mean rate about 5.5/s); `rescale` it to the rate
    the served model needs. `path` overrides the file; otherwise it is looked up in the data dir.
    """
    if path is None:
        path = resolve_data_dir(data_dir) / AZURE_LLM_FILE
    tr = read_csv(path, column="TIMESTAMP", name="azure-llm-2023")
    return Trace(tr.times, name=tr.name, meta={**tr.meta, "kind": "azure-llm"})


def azure_functions(path: str | os.PathLike, functions: Sequence[int | str] | int | str | None = None,
                    seed: Seed = 0) -> Trace:
    """Arrivals from an Azure Functions 2019 per-minute invocation-count file.

    Layout (e.g. `invocations_per_function_md.anon.d01.csv`): header
    HashOwner,HashApp,HashFunction,Trigger,1,2,...,1440 and one row per function holding its
    invocation count in each minute. `functions` picks rows to sum: ints are 0-based data-row
    indices, strings are HashFunction values; None sums every row. Each minute's count becomes
    that many arrivals spread uniformly (seeded) within the minute, as the paper's artifact did.
    """
    path = Path(path)
    where = str(path)
    if functions is not None and isinstance(functions, (int, np.integer, str)):
        functions = [functions]
    want_rows = {f for f in functions or () if isinstance(f, (int, np.integer))}
    want_hash = {f for f in functions or () if isinstance(f, str)}
    found_rows, found_hash = set(), set()
    total: np.ndarray | None = None
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{where}: empty file")
        header = [c.strip() for c in header]
        minutes = header[len(FUNCTION_ID_COLUMNS):]
        if (tuple(header[: len(FUNCTION_ID_COLUMNS)]) != FUNCTION_ID_COLUMNS or not minutes
                or minutes != [str(i) for i in range(1, len(minutes) + 1)]):
            raise ValueError(f"{where}, line 1: expected header {','.join(FUNCTION_ID_COLUMNS)},1,2,...,N; "
                             f"got {','.join(header[:6])}{',...' if len(header) > 6 else ''}")
        total = np.zeros(len(minutes), dtype=np.int64)
        for index, row in enumerate(reader):
            if not row:
                continue
            if functions is not None:
                hit_row = index in want_rows
                hit_hash = len(row) > 2 and row[2] in want_hash
                if not (hit_row or hit_hash):
                    continue
                if hit_row:
                    found_rows.add(index)
                if hit_hash:
                    found_hash.add(row[2])
            if len(row) != len(header):
                raise ValueError(f"{where}, line {reader.line_num}: {len(row)} columns, "
                                 f"header has {len(header)}")
            try:
                counts = np.array(row[len(FUNCTION_ID_COLUMNS):], dtype=np.float64)
            except ValueError:
                bad = next(c for c in row[len(FUNCTION_ID_COLUMNS):] if not _is_number(c))
                raise ValueError(f"{where}, line {reader.line_num}: count {bad!r} is not a number") from None
            wrong = np.flatnonzero(~np.isfinite(counts) | (counts < 0) | (counts != np.round(counts)))
            if wrong.size:
                j = wrong[0]
                bad = row[len(FUNCTION_ID_COLUMNS) + j]
                raise ValueError(f"{where}, line {reader.line_num}, minute {minutes[j]}: count {bad!r} "
                                 "is not a non-negative integer")
            total += counts.astype(np.int64)
    missing = sorted(map(str, (want_rows - found_rows) | (want_hash - found_hash)))
    if missing:
        raise ValueError(f"{where}: no function(s) {', '.join(missing)} (ints are row indices, "
                         "strings HashFunction values)")
    if total.sum() == 0:
        raise ValueError(f"{where}: the selected functions have no invocations")
    rng = np.random.default_rng(seed)
    minute = np.repeat(np.arange(total.size, dtype=np.float64), total)
    times = np.sort((minute + rng.random(minute.size)) * 60.0)
    return Trace(times, name=f"azure-functions:{path.stem}",
                 meta={"kind": "azure-functions", "path": where, "minutes": int(total.size),
                       "functions": None if functions is None else list(functions)})


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------------------------- by name
KINDS = ("fixed", "poisson", "bursty", "azure-llm")


def generate(kind: str, rate: float, n: int | None = None, duration: float | None = None,
             seed: Seed = 0, cv: float = 4.0, data_dir: str | os.PathLike | None = None) -> Trace:
    """A trace by kind name at a mean rate, e.g. for a CLI flag: one of KINDS.

    Real traces are rescaled to `rate`, then cut to n arrivals and/or `duration` seconds.
    """
    if kind == "fixed":
        return fixed_rate(rate, n=n, duration=duration)
    if kind == "poisson":
        return poisson(rate, n=n, duration=duration, seed=seed)
    if kind == "bursty":
        return bursty(rate, cv, n=n, duration=duration, seed=seed)
    if kind == "azure-llm":
        tr = rescale(azure_llm(data_dir=data_dir), rate)
        if duration is not None:
            tr = truncate(tr, duration)
        return tr if n is None else take_first(tr, n)
    raise ValueError(f"unknown trace kind {kind!r}; expected one of {', '.join(KINDS)}")
