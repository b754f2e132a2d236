"""Shared helpers of the benchmark suite (``pytest --benchmark-only``)."""

from __future__ import annotations

import itertools
import statistics
import time


def paired_medians(fns, rounds: int, warmup: int = 3) -> list[float]:
    """Median wall time (s) of each function, the functions run interleaved round by round.

    Interleaving keeps a slow spell of the machine from landing on one side of a ratio.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def rotating(calls):
    """A function that runs the given calls in turn, one per invocation, so that
    consecutive timings do not reuse one input set's warm cache."""
    cycle = itertools.cycle(calls)
    return lambda: next(cycle)()
