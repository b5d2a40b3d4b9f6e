"""Side-by-side timing helpers: interleave the compared runs (A B A B ...) and take medians,
because these machines drift by 1.5x between minutes."""

from __future__ import annotations

import os
import time
from typing import Callable, Sequence

import numpy as np


def interleaved_medians(funcs: Sequence[Callable[[], object]], repeats: int, cpu: bool = False) -> list[float]:
    """Median seconds per call of each function, calls interleaved round by round. With `cpu`,
    this process's CPU time, which other processes on the machine do not inflate."""
    clock = time.process_time if cpu else time.perf_counter
    times: list[list[float]] = [[] for _ in funcs]
    for _ in range(repeats):
        for i, f in enumerate(funcs):
            t0 = clock()
            f()
            times[i].append(clock() - t0)
    return [float(np.median(t)) for t in times]


def thread_note() -> str:
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    return f"{os.cpu_count()} cores, OMP_NUM_THREADS={threads}; the searches are single-threaded Python/numpy"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])
