"""Side-by-side timing for the benchmark suite.

Every case times its candidate and its baselines (the dense backward, and on a GPU also
the plain torch path) *interleaved*, round by round, in one run, so that a slow spell of
the machine lands on both sides of a ratio.

* CPU: pytest-benchmark times the candidate (``benchmark.pedantic``); the baselines run
  in the ``setup`` hook of every round, right before the candidate, timed with
  ``time.perf_counter``. The number of rounds is sized from a warm-up round so that a
  case costs about ``budget_s`` of wall time (bounded by ``min_rounds``/``max_rounds``).
  Each function's last result is kept until its next call (on both sides alike), so
  that freeing and refaulting gradient buffers does not depend on what ran in between.
* CUDA: as ``triton.testing.do_bench`` does: warm-up, then each call between two CUDA
  events with the L2 cache flushed before it, all events read after one synchronize, the
  median kept. A spin kernel between the flush and the start event keeps the GPU busy
  while the host queues the call, so the events time the GPU's work alone: it lasts
  1.5 times the slowest function's host time (measured first), at least ~200 us. (With
  a fixed ~200 us, the first H200 run timed a GPU waiting on a 0.5-1 ms eager host side
  as part of the meProp backward.) The functions take turns within every repetition. pytest-benchmark's own
  record of the candidate (host wall time of a call plus a synchronize) is kept too, but
  ``extra_info['time_median_s']`` (the events' median) is the number the report uses.

On a GPU every function's host time is recorded too (``host_launch_us``, and
``<baseline>_host_launch_us``): the CPU wall time of one eager call, which only launches
the work (:func:`host_launch_seconds`: ``perf_counter`` around each call, no synchronize
between calls, one after them all); and the same run's wall time per call, the final
synchronize included (``eager_loop_us``, ``<baseline>_eager_loop_us``, and
``eager_loop_speedup_vs_dense``): what an eager training loop sees. Where it exceeds the GPU time the GPU waits on Python,
autograd and launch overheads, and only a CUDA graph can help. Where the package's
kernels are loaded, the candidate's host time is also taken with every Triton launch
through Triton's own launch path instead of ``kernels._launch.FastLaunch``
(``host_launch_us_triton_path``).

A speedup is the median over rounds of the two calls' ratio within a round
(``Timings.paired``); the ratio of the two medians is recorded next to it. An overhead is
the median over rounds of the difference within a round (``Timings.paired_diff``).
"""

from __future__ import annotations

import functools
import math
import statistics
import sys
import time
from typing import Callable

import torch

_L2_FLUSH_BYTES = 256 << 20  # larger than any current GPU's L2 (H100: 50 MiB)
#: GPU clock cycles of the spin kernel queued after each L2 flush, before the start event,
#: at the least (about 200 us at an H100's / H200's 1.98 GHz): the host meanwhile queues
#: the call's launches, so the events time the GPU's work, not a GPU waiting on Python,
#: autograd and launch overheads. ``measure`` lengthens it to 1.5 times the slowest
#: function's host time (an eager meProp backward's host side took 0.5-1 ms on the H200
#: machine); that time is reported apart, as ``host_launch_us``.
_HOST_LEAD_CYCLES = 400_000
#: GPU clock rate the spin's cycles are counted in (an H100's / H200's boost clock; a
#: slower clock only makes the spin longer).
_SPIN_HZ = 2.0e9
_flush_buffer: dict = {}


def _flush_l2(device: torch.device) -> None:
    buf = _flush_buffer.get(device)
    if buf is None:
        buf = _flush_buffer[device] = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    buf.zero_()


def _cuda_samples(
    fns: list[Callable], device: torch.device, *, warmup_ms: float, rep_ms: float,
    min_rounds: int, max_rounds: int, lead_cycles: int = _HOST_LEAD_CYCLES,
) -> tuple[list[list[float]], int]:
    """Seconds of each call of each function, per round (CUDA events, interleaved, L2
    flushed, a spin of ``lead_cycles`` GPU cycles before each start event). The callers
    have run each function once already (compiled, autotuned)."""
    # Estimate a round's cost from five back-to-back calls of each.
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    est_ms = 0.0
    for fn in fns:
        start.record()
        for _ in range(5):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        est_ms += start.elapsed_time(end) / 5
    est_ms = max(est_ms, 1e-3)
    for _ in range(max(1, int(warmup_ms / est_ms))):
        for fn in fns:
            fn()
    rounds = min(max_rounds, max(min_rounds, int(rep_ms / est_ms)))
    starts = [[torch.cuda.Event(enable_timing=True) for _ in range(rounds)] for _ in fns]
    ends = [[torch.cuda.Event(enable_timing=True) for _ in range(rounds)] for _ in fns]
    for r in range(rounds):
        for i, fn in enumerate(fns):
            _flush_l2(device)
            torch.cuda._sleep(lead_cycles)
            starts[i][r].record()
            fn()
            ends[i][r].record()
    torch.cuda.synchronize(device)
    samples = [[s.elapsed_time(e) / 1e3 for s, e in zip(starts[i], ends[i])] for i in range(len(fns))]
    return samples, rounds


def lead_cycles(host_s: float) -> int:
    """The spin before each timed call: 1.5 times the slowest host side ``host_s``
    (seconds) in GPU cycles, at least :data:`_HOST_LEAD_CYCLES`, at most ~20 ms."""
    return min(40_000_000, max(_HOST_LEAD_CYCLES, int(1.5 * host_s * _SPIN_HZ)))


def cuda_median_seconds(fn: Callable, device: torch.device, *, rep_ms: float = 30.0) -> float:
    """One function's median GPU time per call, timed as :func:`measure` times on a GPU
    (its host time first, then CUDA events with L2 flushed and a spin that outlasts it)."""
    fn()  # compile / autotune outside the timing
    sync = functools.partial(torch.cuda.synchronize, device)
    sync()
    host = host_launch_seconds(fn, calls=10, sync=sync)
    samples, _ = _cuda_samples([fn], device, warmup_ms=5.0, rep_ms=rep_ms, min_rounds=10, max_rounds=200,
                               lead_cycles=lead_cycles(host))
    return statistics.median(samples[0])


def host_launch_seconds(fn: Callable, *, calls: int = 25, sync: Callable[[], None] | None = None) -> float:
    """Median host wall time of one call of ``fn`` over ``calls`` calls in a row.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs once before the first call and once
    after the last, never in between: on a GPU each call then costs what it takes to
    launch its work (Python, autograd, kernel launches), not the GPU's time. ``calls`` is
    kept small enough that the launch queue does not fill (which would make a launch wait
    on the GPU).
    """
    return host_and_loop_seconds(fn, calls=calls, sync=sync)[0]


def host_and_loop_seconds(
    fn: Callable, *, calls: int = 25, sync: Callable[[], None] | None = None
) -> tuple[float, float]:
    """``(host, loop)``: :func:`host_launch_seconds`'s median host time of one call, and
    the wall time per call of the whole run of ``calls`` calls, from the first call's
    start to the end of the ``sync`` after the last. ``loop`` is what an eager training
    loop sees: on a GPU about the larger of a call's host time and its GPU time."""
    if calls < 1:
        raise ValueError(f"calls must be at least 1; got {calls}")
    if sync is not None:
        sync()
    times = []
    first = time.perf_counter()
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    if sync is not None:
        sync()
    return statistics.median(times), (time.perf_counter() - first) / calls


class Timings(dict):
    """Median seconds per call of each function timed (a dict, name -> seconds), with
    ``paired[name]``: the median over rounds of ``baseline_time / candidate_time``, the two
    taken in the same round. A slow spell of a shared machine lasts many rounds and
    scales both calls of a round alike, so the paired ratio moves less than the ratio of
    the two medians; it is the ``speedup_vs_*`` the suite records and asserts.
    ``paired_diff[name]``: the median over rounds of ``candidate_time - baseline_time``."""

    paired: dict
    paired_diff: dict


def measure(
    benchmark,
    fns: dict[str, Callable],
    *,
    candidate: str,
    device: torch.device | str = "cpu",
    budget_s: float = 1.0,
    min_rounds: int = 3,
    max_rounds: int = 200,
    warmup: int = 2,
) -> Timings | None:
    """Time ``fns[candidate]`` through ``benchmark`` with the other ``fns`` interleaved.

    Returns the median seconds per call of every function, with the paired ratios
    (:class:`Timings`; None when benchmarks are disabled: the candidate then runs once,
    as a smoke test, and nothing else runs).
    Records ``time_median_s``, ``rounds``, ``timer`` and ``<name>_median_s`` of each
    baseline in ``benchmark.extra_info``; on a GPU also ``host_launch_us`` and
    ``<name>_host_launch_us`` (:func:`host_launch_seconds`).
    """
    device = torch.device(device)
    # Every function's last result stays alive until its next call replaces it (as
    # gradients live until the next step), the same for the candidate and the baselines,
    # so that no side gets an allocator that trims and refaults its pages every call.
    last: dict[str, object] = {}

    def keeping(name):
        def run():
            last[name] = fns[name]()
        return run

    baselines = {name: keeping(name) for name in fns if name != candidate}
    target = keeping(candidate)

    if device.type == "cuda":
        def synced():
            target()
            torch.cuda.synchronize(device)
    else:
        synced = target

    if benchmark.disabled:
        benchmark.pedantic(synced)
        return None

    for fn in fns.values():
        prepare = getattr(fn, "prepare", None)
        if prepare is not None:
            prepare()

    if device.type == "cuda":
        names = [*baselines, candidate]
        sync = functools.partial(torch.cuda.synchronize, device)
        for n in names:  # compile / autotune before the host times
            baselines.get(n, target)()
        sync()
        host_loop = {n: host_and_loop_seconds(baselines.get(n, target), sync=sync) for n in names}
        host = {n: h for n, (h, _) in host_loop.items()}
        # The spin before each start event outlasts the slowest host side, so that the
        # events time GPU work, not a GPU waiting on Python.
        lead = lead_cycles(max(host.values()))
        per_fn, rounds = _cuda_samples(
            [baselines.get(n, target) for n in names], device, warmup_ms=25.0, rep_ms=1e3 * budget_s,
            min_rounds=max(min_rounds, 10), max_rounds=max_rounds, lead_cycles=lead,
        )
        samples = dict(zip(names, per_fn))
        host_info = {
            ("host_launch_us" if n == candidate else f"{n}_host_launch_us"): round(t * 1e6, 2)
            for n, t in host.items()
        }
        host_info["host_lead_us"] = round(lead / _SPIN_HZ * 1e6, 1)
        # What an eager loop of calls takes per call (host and GPU overlapping), each side
        host_info.update({
            ("eager_loop_us" if n == candidate else f"{n}_eager_loop_us"): round(loop * 1e6, 2)
            for n, (_, loop) in host_loop.items()
        })
        if "dense" in host_loop and candidate != "dense":
            host_info["eager_loop_speedup_vs_dense"] = round(host_loop["dense"][1] / host_loop[candidate][1], 3)
        # the candidate's host time again with each Triton launch through Triton's own
        # path (binder, cache key) instead of the package's FastLaunch
        launch = sys.modules.get("meprop_triton.kernels._launch")
        if launch is not None and launch.FAST_LAUNCH:
            launch.FAST_LAUNCH = False
            try:
                host_info["host_launch_us_triton_path"] = round(host_launch_seconds(target, sync=sync) * 1e6, 2)
            finally:
                launch.FAST_LAUNCH = True
        # pytest-benchmark's own record: host wall time including a synchronize.
        benchmark.pedantic(synced, rounds=min(rounds, 20), warmup_rounds=1)
        timer = "cuda-events (median, interleaved, L2 flushed before each call)"
    else:
        # Warm-up. The first round is cold (lazy initialisation, first-touch pages); the
        # last one sizes the number of rounds. A case whose warm round already takes
        # most of its budget stops warming up there.
        for i in range(max(warmup, 2)):
            per_round = 0.0
            for fn in (*baselines.values(), target):
                t0 = time.perf_counter()
                fn()
                per_round += time.perf_counter() - t0
            if i >= 1 and per_round > budget_s / 2:
                break
        rounds = min(max_rounds, max(min_rounds, math.ceil(budget_s / max(per_round, 1e-9))))
        times: dict[str, list[float]] = {name: [] for name in baselines}

        def run_baselines():
            for name, fn in baselines.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)

        benchmark.pedantic(target, setup=run_baselines, rounds=rounds, warmup_rounds=0)
        samples = {**times, candidate: list(benchmark.stats.stats.data)}
        timer = "perf_counter (median; baselines run right before the candidate each round)"
        host_info = {}

    last.clear()
    medians = Timings({name: statistics.median(ts) for name, ts in samples.items()})
    medians.paired = {
        name: statistics.median(b / c for b, c in zip(samples[name], samples[candidate]))
        for name in baselines
    }
    medians.paired_diff = {  # candidate minus baseline, per round: the time it adds
        name: statistics.median(c - b for b, c in zip(samples[name], samples[candidate]))
        for name in baselines
    }
    benchmark.extra_info.update(
        time_median_s=medians[candidate],
        rounds=rounds,
        timer=timer,
        **{f"{name}_median_s": t for name, t in medians.items() if name != candidate},
        **host_info,
    )
    return medians


def peak_memory(fn: Callable, device: torch.device | str) -> dict:
    """``peak_mem_bytes``: the most memory one call of ``fn`` holds above what was allocated
    before it (CUDA: ``torch.cuda.max_memory_allocated``; its results included). On a CPU
    torch keeps no allocator statistics, so nothing is measured and the record says so."""
    device = torch.device(device)
    if device.type != "cuda":
        return {
            "peak_mem_bytes": None,
            "peak_mem_note": "not measured on CPU (torch keeps no CPU allocator statistics)",
        }
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return {"peak_mem_bytes": int(peak)}
