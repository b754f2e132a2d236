"""Launch for launch, ``kernels._launch.FastLaunch`` against Triton's own launch path.

Run as a script by ``test_fast_launch.py``, in a process where triton was imported
without ``TRITON_INTERPRET`` (the kernels are the compiled ones) and Triton's driver is
``bench/stand_in_driver.py``'s: every launch really goes through Triton's binder, its
specialisation and a real sm_90 compile, and the launcher records what it is handed
(the function handle names the compiled binary). Writes a JSON summary to argv[1];
exits non-zero, saying where, at the first difference.

1. ``classes``: ``scores.finish_kernel`` launched with integers and tensors of every
   specialisation class Triton knows (an integer 1, a multiple of 16 or not, in the i32,
   i64 or u64 range; a tensor 16-byte aligned or not; another dtype; another constexpr),
   in a shuffled order with repeats, each call once through Triton and once through the
   fast path with the same arguments: the launcher must be handed the same thing.
2. ``backward``: the launches of a unified Triton backward (both routes' Triton kernels,
   the per-example selection too), made by the package's own launchers with the fast path
   off, then on twice (the first pass fills its cache, the second finds every launch
   there): the same launches, tensor arguments compared by dtype, shape, strides and
   alignment (each call allocates its own), everything else exactly; and in the second
   pass Triton's ``JITFunction.run`` is not called at all.
3. ``fallbacks``: a callable grid and a kernel with a pre-run hook go through Triton's
   run on every launch.
4. ``refusals``: an int subclass goes through Triton's run every time; a Triton setting
   changed after the first launch (``knobs.runtime.debug``) gets its own binary, as
   through Triton; no fast path on AMD's backend; ``launchable`` traces under
   ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
from torch._library.triton import set_wrap_triton_enabled  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from bench.host_glue import launching  # noqa: E402
from bench.stand_in_driver import stand_in  # noqa: E402
from meprop_triton.kernels import _launch  # noqa: E402


def _fail(msg: str):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def _meta(m):
    """A launch's metadata as a comparable value (a fresh LazyDict each launch)."""
    return m if m is None else dict(m.get())


def _exact(rec):
    return rec[:6] + (_meta(rec[6]),) + rec[7:]


@contextlib.contextmanager
def _counting_runs():
    """Within: Triton's ``JITFunction.run`` counts its calls in the yielded dict's "n"."""
    runs = {"n": 0}
    real_run = JITFunction.run

    def counted(self, *args, **kwargs):
        runs["n"] += 1
        return real_run(self, *args, **kwargs)

    JITFunction.run = counted
    try:
        yield runs
    finally:
        JITFunction.run = real_run


def _shape(v):
    if isinstance(v, torch.Tensor):
        return ("tensor", v.dtype, tuple(v.shape), tuple(v.stride()), v.data_ptr() % 16)
    return v


def _structural(rec):
    return rec[:6] + (_meta(rec[6]),) + rec[7:9] + tuple(_shape(v) for v in rec[9:])


def classes(launches) -> dict:
    from meprop_triton.kernels import scores

    kernel = scores.finish_kernel
    fast = _launch.FastLaunch(kernel)
    base = torch.randn(4, 4160)
    parts_abs, parts_sum = base[0], base[1]
    out32 = torch.empty(4160)
    out16 = torch.empty(4160, dtype=torch.bfloat16)
    tensors = {
        "aligned": (parts_abs, parts_sum, out32, out32),
        "misaligned": (base[2, 1:], parts_sum, out32, out32[3:]),  # 4 and 12 bytes off
        "bf16 bias": (parts_abs, parts_sum, out32, out16),
        "bf16 bias misaligned": (parts_abs, parts_sum, out32, out16[1:]),
    }
    ints = [0, 1, 2, 15, 16, 17, 4096, 4095, -1, -16, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 1,
            2**32, 2**63 - 16, 2**63 - 1, 2**63, 2**64 - 16, 2**64 - 1]
    calls = [(t, n, s, b) for t in tensors for n in ints for s in (1, 4, 32) for b in (128, 256)
             if not (b == 256 and t.startswith("bf16"))]
    rng = random.Random(7)
    calls = calls + rng.sample(calls, len(calls) // 2)  # repeats: cache hits
    rng.shuffle(calls)
    binaries = set()
    for t, n, s, b in calls:
        args = tensors[t] + (n, s)
        del launches[:]
        kernel[(3,)](*args, BLOCK_N=b, num_warps=4)
        fast[(3,)](*args, BLOCK_N=b, num_warps=4)
        if len(launches) != 2:
            _fail(f"classes: {len(launches)} launches for one call each ({t}, N={n}, SPLIT={s}, BLOCK_N={b})")
        triton_rec, fast_rec = (_exact(r) for r in launches)
        binaries.add(triton_rec[4])
        if triton_rec != fast_rec:
            _fail(f"classes: the fast path launched something else for ({t}, N={n}, SPLIT={s}, BLOCK_N={b}):\n"
                  f"  triton: {triton_rec[:9]}\n  fast:   {fast_rec[:9]}")
    # the fast path's keys are at least as fine as Triton's: as many or more
    keys = sum(len(plan[1]) for plan in fast._plans.values() if plan)
    return {"calls": len(calls), "fast_path_keys": keys, "binaries": len(binaries)}


def _backward_launches():
    """The Triton launches of a few backwards, through the package's own launchers."""
    from meprop_triton import triton_ops
    from meprop_triton.kernels.per_example import row_topk_indices

    gen = torch.Generator().manual_seed(0)
    for (M, n_in, n_out, k, dtype) in [(64, 48, 300, 13, torch.bfloat16), (33, 40, 5000, 205, torch.float32),
                                       (16, 24, 17000, 9, torch.float16)]:
        grad = torch.randn(M, n_out, generator=gen).to(dtype)
        x = torch.randn(M, n_in, generator=gen).to(dtype)
        w = torch.randn(n_out, n_in, generator=gen).to(dtype)
        for route in ("cublas", "triton"):
            triton_ops.UNIFIED_GEMMS = route
            try:
                # the indices are never computed (nothing runs): copy none into grad_W
                torch.Tensor.index_copy_, saved = (lambda self, dim, index, src: self), torch.Tensor.index_copy_
                triton_ops._unified_topk_backward(grad, x, w, k, True, True, True)
            finally:
                torch.Tensor.index_copy_ = saved
                triton_ops.UNIFIED_GEMMS = "auto"
        row_topk_indices(grad[:, :4096] if n_out > 4096 else grad, min(k, 64))


def backward(launches) -> dict:
    passes = []
    for fast_on in (False, True, True):
        _launch.FAST_LAUNCH = fast_on
        del launches[:]
        # launched for real (into the stand-in), each GEMM with its one config; wrap_triton
        # off, as the op's eager body runs
        with _counting_runs() as runs, launching(90), set_wrap_triton_enabled(False):
            _backward_launches()
        passes.append(([_structural(r) for r in launches], runs["n"]))
    (off, off_runs), (first, _), (second, second_runs) = passes
    if not off:
        _fail("backward: no launch was recorded")
    for name, got in (("first fast pass", first), ("second fast pass", second)):
        if len(got) != len(off):
            _fail(f"backward: {len(got)} launches in the {name}, {len(off)} through Triton's path")
        for i, (a, b) in enumerate(zip(off, got)):
            if a != b:
                _fail(f"backward: launch {i} differs in the {name}:\n  triton: {a[:9]}\n  fast:   {b[:9]}")
    if off_runs != len(off):
        _fail(f"backward: Triton's run called {off_runs} times for {len(off)} launches with the fast path off")
    if second_runs != 0:
        _fail(f"backward: Triton's run still called {second_runs} times once every launch was cached")
    return {"launches": len(off), "kernels": sorted({r[4].split(":")[0] for r in off})}


def fallbacks(launches) -> dict:
    """What the fast path leaves to Triton every time: a callable grid, a kernel with a
    pre-run hook. Each launch goes through Triton's run and launches what it launches."""
    from meprop_triton.kernels import scores

    kernel = scores.finish_kernel
    fast = _launch.FastLaunch(kernel)
    base = torch.randn(3, 512)
    args = (base[0], base[1], base[2], torch.empty(512), 512, 1)
    hook_calls = []
    with _counting_runs() as runs:
        for _ in range(3):
            fast[lambda meta: (2,)](*args, BLOCK_N=256, num_warps=4)
        kernel.pre_run_hooks.append(lambda *a, **kw: hook_calls.append(1))
        try:
            for _ in range(3):
                fast[(2,)](*args, BLOCK_N=256, num_warps=4)
        finally:
            kernel.pre_run_hooks.pop()
        for _ in range(3):
            fast[(2,)](*args, BLOCK_N=256, num_warps=4)
    if runs["n"] != 7 or len(hook_calls) != 3:
        _fail(f"fallbacks: Triton's run called {runs['n']} times (expected 7: 3 callable-grid launches, "
              f"3 with a pre-run hook, then 1 to fill the cache), the hook {len(hook_calls)} times (expected 3)")
    recs = [_exact(r) for r in launches[-9:]]
    if any(r[:3] != (2, 1, 1) for r in recs) or len({r[4] for r in recs}) != 1:
        _fail("fallbacks: the launches differ")
    return {"triton_runs": runs["n"]}


def refusals(launches) -> dict:
    """What the fast path keeps out of its cache: an int subclass (Triton classes it by
    value), a changed Triton setting (``knobs.runtime.debug``: another binary), a kernel
    on AMD's backend (it also specialises a tensor on its storage's size); and
    ``launchable`` under ``torch.compile`` (dynamo traces through it, ``fullgraph``)."""
    import enum

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    from bench.stand_in_driver import StandInDriver
    from meprop_triton.kernels import scores

    kernel = scores.finish_kernel
    fast = _launch.FastLaunch(kernel)
    base = torch.randn(3, 512)
    out = torch.empty(512)

    class Slices(enum.IntEnum):
        ONE = 1
        SIXTEEN = 16

    with _counting_runs() as runs:
        for split in (Slices.SIXTEEN, Slices.ONE, Slices.SIXTEEN, Slices.ONE):
            args = (base[0], base[1], base[2], out, 512, split)
            del launches[:]
            kernel[(2,)](*args, BLOCK_N=256, num_warps=4)
            fast[(2,)](*args, BLOCK_N=256, num_warps=4)
            if _exact(launches[0]) != _exact(launches[1]):
                _fail(f"refusals: an IntEnum argument ({split!r}) launched another binary than Triton's")
        intenum_runs = runs["n"]
        if intenum_runs != 8:
            _fail(f"refusals: {intenum_runs} runs through Triton for 8 launches with an IntEnum argument")
        # a Triton setting changed after the first launch
        args = (base[0], base[1], base[2], out, 512, 3)
        del launches[:]
        fast[(2,)](*args, BLOCK_N=256, num_warps=4)
        triton.knobs.runtime.debug = True
        try:
            fast[(2,)](*args, BLOCK_N=256, num_warps=4)
            kernel[(2,)](*args, BLOCK_N=256, num_warps=4)
        finally:
            triton.knobs.runtime.debug = False
        fast[(2,)](*args, BLOCK_N=256, num_warps=4)
        plain, debug, debug_triton, plain_again = (_exact(r)[4] for r in launches)
        if debug == plain or debug != debug_triton or plain_again != plain:
            _fail(f"refusals: with TRITON_DEBUG's knob set after the first launch the fast path ran {debug}, "
                  f"Triton {debug_triton}, without it {plain} and then {plain_again}")

    class AmdStandIn(StandInDriver):
        def get_current_target(self):
            return GPUTarget("hip", "gfx942", 64)

    nvidia = driver._active
    driver.set_active(AmdStandIn())
    try:
        amd_usable = _launch.FastLaunch.usable(kernel)
    finally:
        driver.set_active(nvidia)
    if amd_usable or not _launch.FastLaunch.usable(kernel):
        _fail(f"refusals: FastLaunch.usable on AMD's backend {amd_usable}, on NVIDIA's "
              f"{_launch.FastLaunch.usable(kernel)}")

    traced = {}
    for traceable in (False, True):
        torch._dynamo.reset()

        def step(x, traceable=traceable):
            _launch.launchable(scores.finish_kernel, traceable)
            return x + 1

        try:
            torch.compile(step, backend="eager", fullgraph=True)(torch.zeros(4))
            traced[str(traceable)] = True
        except Exception as e:  # noqa: BLE001 - reported
            _fail(f"refusals: torch.compile(fullgraph=True) cannot trace launchable(traceable={traceable}): "
                  f"{str(e).splitlines()[0]}")
    return {"intenum_runs": intenum_runs, "amd_usable": amd_usable, "traced": traced}



def main():
    out = Path(sys.argv[1])
    summary = {}
    with stand_in(90) as launches:
        summary["classes"] = classes(launches)
        summary["backward"] = backward(launches)
        summary["fallbacks"] = fallbacks(launches)
        summary["refusals"] = refusals(launches)
    out.write_text(json.dumps(summary))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
