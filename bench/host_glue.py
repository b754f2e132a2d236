"""The host (Python) time of one eager unified Triton backward, read on a machine without
a GPU.

``python bench/host_glue.py [--shape M IN OUT] [--k K] [--dtype D] [--calls N]
[--launch drop|triton|fast] [--json PATH]``

At the target shape the backward's GPU work is ~80 us, so the Python that prepares it
(argument checks, allocations, grid arithmetic, the op's dispatch, each launch's own
Python) can bound an eager training step as much as the kernels do. This tool runs the
public op function (``triton_ops.unified_topk_backward``, as a ``MePropLinear`` backward
calls it) on CPU tensors of the shape, taken for a Hopper GPU's (its SM count and
configs, as ``codegen.recording`` sets them). ``--launch`` says what becomes of each
kernel launch:

* ``drop`` (the default): dropped, so what is timed is the package's own glue;
* ``triton``: through Triton's own launch path (``kernel[grid](...)``: its argument
  binding, specialisation and cache lookup), under ``bench/stand_in_driver.py``'s driver,
  whose launcher does nothing (the first call compiles each kernel for sm_90 here);
* ``fast``: through ``kernels._launch.FastLaunch``, as an eager backward on a GPU
  launches (Triton's path for the first launch of each specialisation only).

What no mode counts is the launcher's C side (packing the arguments, ``cuLaunchKernel``:
a few microseconds a launch), which only a GPU shows (``bench/gpu_run.sh`` records the
whole ``host_launch_us``). ``triton`` and ``fast`` run each kernel's one test config
(an autotuner would time its candidates, and the stand-in runs nothing), ``drop`` the
autotuned GEMMs' cached lookup.

An upper bound: on a CPU every tensor above 32 MiB that the call allocates is an
mmap / munmap pair (a few microseconds each), which a GPU's caching allocator does not
pay. The unified path's host code runs no torch computation, only allocations, so
nothing else is counted that a GPU would run asynchronously. Prints the median
microseconds per call over 15 rounds of ``--calls`` calls, and the launches one call
makes.

It times the route whose every step is a Triton launch (``triton_ops.UNIFIED_GEMMS =
"triton"``). The default route hands the two products to cuBLAS: its first three
launches (scores, top-k, compaction) and their glue are the same, and the three GEMM
launches become three torch operations (two ``mm`` and an ``index_copy_``) which a CPU
would run, not just dispatch, at this shape; their host cost is torch's dispatch, which
``gpu_run.sh`` measures with the rest (``host_launch_us``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

if __package__ in (None, ""):  # run as a script: make ``bench`` and the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from bench.codegen import DTYPES, forced, recording


class _NoLaunch:
    """Stands for ``launchable(kernel)``: ``[grid](*args)`` does nothing, keeps nothing."""

    def __getitem__(self, grid):
        return self._launch

    @staticmethod
    def _launch(*args, **kwargs):
        return None


@contextlib.contextmanager
def stubbed(arch: int):
    """Within: as ``codegen.recording(arch)`` (CPU tensors taken for a GPU's with that
    architecture's SMs and configs), but a launch is dropped, not recorded, so that
    nothing a call allocated outlives it."""
    from meprop_triton.kernels import _launch

    with recording(arch):
        _launch.launchable = lambda kernel, traceable=False: _NO_LAUNCH
        yield


_NO_LAUNCH = _NoLaunch()


@contextlib.contextmanager
def launching(arch: int):
    """Within: as ``codegen.recording(arch)`` (CPU tensors taken for a GPU's), but each
    launch goes to Triton (or ``FastLaunch``) for real, into whichever driver is active:
    with ``bench/stand_in_driver.py``'s, Triton's whole launch path runs and nothing is
    launched. Each kernel takes its one test config: an autotuner would time its
    candidates, and the stand-in times nothing."""
    from meprop_triton.kernels import _launch

    real = _launch.launchable
    with recording(arch):
        _launch.launchable = real
        _launch.FORCE_SINGLE_CONFIG = True
        yield


@contextlib.contextmanager
def through_triton(arch: int, fast: bool):
    """Within: :func:`launching` under the stand-in driver (which launches nothing), each
    launch through Triton's own launch path, or with ``fast`` through
    ``kernels._launch.FastLaunch``."""
    from bench.stand_in_driver import stand_in
    from meprop_triton.kernels import _launch

    with stand_in(arch, record=False), launching(arch), forced(_launch, "FAST_LAUNCH", fast):
        yield


#: ``--launch``: what each kernel launch costs in the timed calls
LAUNCH_MODES = {
    "drop": "dropped: the package's glue alone",
    "triton": "through Triton's own launch path (binding, specialisation, cache key; launcher stubbed)",
    "fast": "through the package's FastLaunch (Triton's path for the first launch of each specialisation)",
}


def measure(M: int, n_in: int, n_out: int, k: int, *, dtype=torch.bfloat16, calls: int = 200,
            rounds: int = 15, arch: int = 90, launch: str = "drop") -> dict:
    """``{"us_per_call", "launches", "launch_names", ...}`` for one unified backward
    (grad of x, W and b) at this shape, timed as the module describes; ``launch``: one of
    :data:`LAUNCH_MODES`."""
    from meprop_triton import triton_ops

    if not 1 <= k <= n_out:
        raise ValueError(f"k must lie in [1, OUT={n_out}]; got {k}")
    if launch not in LAUNCH_MODES:
        raise ValueError(f"launch must be one of {sorted(LAUNCH_MODES)}; got {launch!r}")
    with forced(triton_ops, "UNIFIED_GEMMS", "triton"):  # every step a Triton launch: see above
        return _measure(triton_ops.unified_topk_backward, M, n_in, n_out, k, dtype, calls, rounds, arch, launch)


def _measure(fn, M, n_in, n_out, k, dtype, calls, rounds, arch, launch="drop"):
    device = "cpu"
    grad = torch.empty(M, n_out, dtype=dtype, device=device)
    x = torch.empty(M, n_in, dtype=dtype, device=device)
    weight = torch.empty(n_out, n_in, dtype=dtype, device=device)
    with recording(arch) as rec:
        if launch != "drop":  # the configs the timed calls take (through_triton's)
            from meprop_triton.kernels import _launch

            _launch.FORCE_SINGLE_CONFIG = True
        fn(grad, x, weight, k)  # the first call imports and builds what later calls reuse
        names = [launch.name for launch in rec.launches]
    del rec
    times = []
    with stubbed(arch) if launch == "drop" else through_triton(arch, launch == "fast"):
        if launch != "drop":
            fn(grad, x, weight, k)  # compiles each kernel (for sm_<arch>, on this CPU) once
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(calls):
                fn(grad, x, weight, k)
            times.append((time.perf_counter() - start) / calls * 1e6)
    return {
        "shape": [M, n_in, n_out], "k": k, "dtype": str(dtype).removeprefix("torch."),
        "us_per_call": statistics.median(times), "us_min": min(times),
        "launches": len(names), "launch_names": names, "launch": launch,
        "torch": torch.__version__, "triton": _triton_version(),
    }


def _triton_version():
    import triton

    return triton.__version__


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--shape", type=int, nargs=3, metavar=("M", "IN", "OUT"), default=[8192, 4096, 4096])
    ap.add_argument("--k", type=int, default=205)
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--launch", default="drop", choices=list(LAUNCH_MODES),
                    help="each launch: " + "; ".join(f"{k}: {v}" for k, v in LAUNCH_MODES.items()))
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the ops must be the compiled-kernel ones", file=sys.stderr)
        return 2
    M, n_in, n_out = args.shape
    try:
        rec = measure(M, n_in, n_out, args.k, dtype=DTYPES[args.dtype], calls=args.calls, launch=args.launch)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    print(f"unified backward, M={M} in={n_in} out={n_out} k={args.k} {args.dtype}: "
          f"{rec['us_per_call']:.1f} us of host time per call (min {rec['us_min']:.1f}), "
          f"launches {LAUNCH_MODES[args.launch]}; "
          f"{rec['launches']} launches: {', '.join(rec['launch_names'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rec, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
