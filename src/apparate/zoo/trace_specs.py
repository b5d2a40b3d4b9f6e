"""Traces by name for every command that takes `--trace`: a synthetic process, or real arrivals
read from a file, fitted to the run.

    fixed | poisson | gamma | azure        synthetic (gamma: bursty, `--cv`), or the Azure LLM
                                           inference trace 2023 from the data directory
    file:PATH                              arrival times, one per row: seconds or date-times
                                           (`traces.read_csv`)
    azure-functions:PATH[:FUNCTION]        Azure Functions per-minute counts (`traces.azure_functions`);
                                           FUNCTION a 0-based row index or a HashFunction value
                                           (default: every row summed)

A real trace keeps its own times unless a rate is given, when it is rescaled to that mean rate
with its shape kept. Then it is fitted to what the run needs, `n` arrivals or `duration` seconds:
cut when longer, repeated end to end (one mean gap between copies) when shorter, and `fit_note`
says which, because a trace played 3 times over is a different workload from the one in the file.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apparate.zoo import traces

SYNTHETIC = {"fixed": "fixed", "poisson": "poisson", "gamma": "bursty", "bursty": "bursty"}
REAL = ("azure", "file:", "azure-functions:")
DEFAULT_RATE = 30.0  # requests per second for synthetic traces when none is given
HELP = ("arrival process: fixed, poisson, gamma (bursty, --cv), azure (the Azure LLM 2023 trace), "
        "file:PATH (your arrival times: seconds or date-times, one per row), or "
        "azure-functions:PATH[:FUNCTION] (per-minute counts; FUNCTION a row index or HashFunction). "
        "Real traces keep their own rate unless --rate is given, and are cut or repeated to the run's length")


@dataclass(frozen=True)
class Fitted:
    times: np.ndarray  # seconds from the first arrival
    name: str
    note: str  # how the trace was rescaled, cut or repeated: say it beside the results
    rate: float  # mean rate of `times`


def is_real(spec: str) -> bool:
    """Whether the trace is read (a file, or the Azure LLM trace) rather than generated."""
    return spec == "azure" or spec.startswith(REAL[1:])


def parse(spec: str) -> tuple[str, Path | None, int | str | None]:
    """(kind, path, function) of a --trace value; ValueError naming the choices otherwise."""
    if spec in SYNTHETIC:
        return SYNTHETIC[spec], None, None
    if spec in ("azure", "azure-llm"):
        return "azure-llm", None, None
    if spec.startswith("file:") and len(spec) > 5:
        return "file", Path(spec[5:]), None
    if spec.startswith("azure-functions:") and len(spec) > 16:
        rest = spec[16:]
        path, sep, func = rest.rpartition(":")
        # a path that exists as given has no FUNCTION part (and may hold a colon of its own)
        if not sep or Path(rest).exists() or not path:
            return "azure-functions", Path(rest), None
        return "azure-functions", Path(path), int(func) if func.isdigit() else func
    raise ValueError(f"unknown trace {spec!r}: use fixed, poisson, gamma, azure, file:PATH or "
                     "azure-functions:PATH[:FUNCTION]")


def read(spec: str, seed: int = 0, data_dir: str | os.PathLike | None = None) -> traces.Trace:
    """A real trace as its file gives it (checked row by row: errors name the line)."""
    kind, path, func = parse(spec)
    if kind == "azure-llm":
        return traces.azure_llm(data_dir=data_dir)
    if kind == "file":
        return traces.read_csv(path)
    if kind == "azure-functions":
        return traces.azure_functions(path, func, seed=seed)
    raise ValueError(f"{spec!r} is a synthetic trace, not one read from a file")


def check(spec: str, data_dir: str | os.PathLike | None = None) -> None:
    """Raise before any work if `spec` is malformed or names a file that cannot be read as a trace."""
    if is_real(spec) and parse(spec)[0] != "azure-llm":
        tr = read(spec, data_dir=data_dir)
        if len(tr) < 2 or not tr.times[-1] > tr.times[0]:
            raise ValueError(f"trace {spec}: needs at least two arrivals at different times, has {len(tr)}")
    else:
        parse(spec)


def _repeat(times: np.ndarray, copies: int) -> np.ndarray:
    """`times` (from 0) played `copies` times end to end, one mean gap between copies."""
    period = times[-1] + times[-1] / (times.size - 1)
    return (times[None, :] + period * np.arange(copies)[:, None]).reshape(-1)


def fit(trace: traces.Trace, n: int | None = None, duration: float | None = None) -> tuple[np.ndarray, str]:
    """Times from the first arrival, cut or repeated to `n` arrivals or `duration` seconds."""
    t = np.asarray(trace, dtype=np.float64)
    if t.size < 2 or not t[-1] > t[0]:
        raise ValueError(f"trace {trace.name}: needs at least two arrivals at different times, has {t.size}")
    t = t - t[0]
    have = f"{t.size} arrivals over {t[-1]:.4g} s"
    if n is not None:
        if t.size >= n:
            return t[:n], ("used whole" if t.size == n else f"cut to its first {n} of {have}")
        copies = math.ceil(n / t.size)
        return _repeat(t, copies)[:n], f"repeated {copies} times ({have}) to cover {n} inputs"
    if duration is None:
        return t, f"used whole ({have})"
    if t[-1] >= duration:
        kept = t[t < duration]
        return kept, f"cut to its first {duration:g} s ({kept.size} of {have})"
    copies = math.ceil(duration / (t[-1] + t[-1] / (t.size - 1)))
    out = _repeat(t, max(copies, 1))
    return out[out < duration], f"repeated {copies} times ({have}) to cover {duration:g} s"


def make(spec: str, n: int | None = None, duration: float | None = None, rate: float | None = None,
         seed: int = 0, cv: float = 2.0, data_dir: str | os.PathLike | None = None) -> Fitted:
    """The arrivals a run replays or sends: `n` of them, or those within `duration` seconds.

    Synthetic traces are drawn at `rate` (default 30/s); real ones are rescaled to `rate` when it
    is given, then fitted (see `fit`)."""
    kind, _, _ = parse(spec)
    if not is_real(spec):
        r = DEFAULT_RATE if rate is None else rate
        times = np.asarray(traces.generate(kind, r, n=n, duration=duration, seed=seed, cv=cv), dtype=np.float64)
        return Fitted(times - (times[0] if times.size else 0.0), spec, f"{spec} at {r:g}/s", r)
    tr = read(spec, seed=seed, data_dir=data_dir)
    own = traces.mean_rate(tr) if len(tr) >= 2 and tr.times[-1] > tr.times[0] else float("nan")
    note = f"{tr.name}: its own rate {own:.4g}/s"
    if rate is not None:
        tr = traces.rescale(tr, rate)
        note = f"{tr.name}: rescaled from {own:.4g}/s to {rate:g}/s"
    times, how = fit(tr, n, duration)
    rate_now = traces.mean_rate(times) if times.size >= 2 and times[-1] > 0 else (rate or own)
    return Fitted(times, tr.name, f"{note}, {how}", rate_now)
