"""What the Triton backward compiles to on a GPU, read on a machine without one.

``python bench/codegen.py --arch 90 --shape M IN OUT --k K [K ...] --dtype bfloat16
[float16 ...] [--mode unified|per-example] [--only PREFIX ...] [--json PATH]``

The backward's own host code runs on CPU tensors of the given shape with every kernel
launch *recorded* instead of executed (the kernel, its grid, its arguments). Each launch
is then compiled for ``sm_<arch>`` exactly as Triton's launcher would specialise it:
the launcher's own argument binder (``create_function_from_signature``) derives the
integer-divisibility / alignment hints and the stride-1 constants from the real
arguments, so k = 205 compiles as "not a multiple of 16", a contiguous G as unit
column stride, and so on. An autotuned kernel is compiled once for every config its
pruning keeps on that architecture (the autotuner may pick any of them).

Per compiled kernel the report gives: registers, stack (spill) bytes and spill
instructions, shared memory, the MMA kind (``wgmma`` / ``mma.sync`` / ``fma`` for a
``tl.dot`` without tensor cores / ``none``), whether the main loop's operand tiles are
loaded asynchronously (``cp.async`` or TMA; ``None`` for kernels without an MMA),
programs launched against the GPU's SMs, the bytes and FLOPs the kernel must move and
do at the least, and its roofline bound in microseconds on each GPU of
:data:`bench.hardware.GPU_PEAKS` that is named in :data:`ROOFLINE_GPUS`.

Importable: :func:`report` returns the same records the ``--json`` option writes
(tests/kernels/test_codegen.py asserts on them). Needs triton (no GPU, no CUDA driver);
``cuobjdump`` from triton's wheel reads registers and SASS, and is optional.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

if __package__ in (None, ""):  # run as a script: make ``bench`` and the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from bench.hardware import GPU_PEAKS

#: GPUs whose roofline bound each record carries (keys of ``GPU_PEAKS``), with SM counts.
ROOFLINE_GPUS = {"H100": 132, "H200": 132}
#: SMs of the architecture a report is made for (the programs-vs-SMs column).
ARCH_SMS = {80: 108, 90: 132}
#: Shared memory a block may use (opt-in maximum): A100 163 KiB, H100 / H200 227 KiB.
SHARED_LIMIT = {80: 167936, 90: 232448}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --- recording the launches ------------------------------------------------------------


@dataclass
class Launch:
    """One kernel launch the host code made: the kernel (a JITFunction or an Autotuner),
    its grid (a tuple or a callable of the meta-parameters) and its arguments."""

    kernel: object
    grid: object
    args: tuple
    kwargs: dict

    @property
    def jit(self):
        """The JITFunction (an Autotuner's ``fn``)."""
        from triton.runtime.autotuner import Autotuner

        return self.kernel.fn if isinstance(self.kernel, Autotuner) else self.kernel

    @property
    def name(self) -> str:
        fn = self.jit
        return f"{fn.fn.__module__.rsplit('.', 1)[-1]}.{fn.fn.__name__}"


@dataclass
class _Recorder:
    launches: list = field(default_factory=list)

    def launchable(self, kernel, traceable=False):
        rec = self

        class _Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    rec.launches.append(Launch(kernel, grid, args, kwargs))
                return launch

        return _Grid()


@contextlib.contextmanager
def recording(arch: int):
    """Within: kernel launches are recorded (not run), CPU tensors are accepted as if
    they were on a GPU with ``ARCH_SMS[arch]`` SMs of compute capability ``arch``."""
    from meprop_triton.kernels import _launch

    rec = _Recorder()
    saved = {
        n: getattr(_launch, n)
        for n in ("launchable", "interpreter_enabled", "num_sms", "capability", "shared_memory_limit")
    }
    _launch.launchable = rec.launchable
    _launch.interpreter_enabled = lambda: True
    _launch.num_sms = lambda device: ARCH_SMS[arch]
    _launch.capability = lambda device: (arch // 10, arch % 10)
    _launch.shared_memory_limit = lambda device: SHARED_LIMIT[arch]
    single = _launch.FORCE_SINGLE_CONFIG
    _launch.FORCE_SINGLE_CONFIG = False  # the autotuner's candidates, not the test config
    try:
        yield rec
    finally:
        for n, v in saved.items():
            setattr(_launch, n, v)
        _launch.FORCE_SINGLE_CONFIG = single


@contextlib.contextmanager
def forced(module, name: str, value):
    """Within: ``module.<name>`` is ``value`` (a route switch of ``triton_ops``, say)."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def record_backward(M: int, n_in: int, n_out: int, k: int, dtype: torch.dtype, mode: str, arch: int) -> list:
    """The launches of one backward (grad of x, W and b) at this shape, recorded."""
    from meprop_triton import triton_ops

    gen = torch.Generator().manual_seed(0)
    grad = torch.empty(M, n_out, dtype=dtype)
    x = torch.empty(M, n_in, dtype=dtype)
    weight = torch.empty(n_out, n_in, dtype=dtype)
    # The Triton kernels' code whatever route "auto" would take: the other routes'
    # products are cuBLAS GEMMs (the unified default, UNIFIED_GEMMS; per-example's masked
    # route, per_example_route), whose code no Triton compile shows, and which would run
    # here, as torch ops, on the indices of a top-k launch that was only recorded.
    if mode == "unified":
        setting, route, run = "UNIFIED_GEMMS", "triton", triton_ops._unified_topk_backward
    elif mode == "per-example":
        setting, route, run = "PER_EXAMPLE_ROUTE", "gather", triton_ops._per_example_topk_backward
    else:
        raise ValueError(f"mode must be 'unified' or 'per-example'; got {mode!r}")
    masked = mode == "per-example" and triton_ops.per_example_route(M, n_out, k, dtype) == "masked"
    with recording(arch) as rec, forced(triton_ops, setting, route):
        run(grad, x, weight, k, True, True, True)
        if masked:
            # that route's one Triton launch: the selection writing the masked copy of G
            from meprop_triton.kernels.per_example import row_topk_indices

            row_topk_indices(grad, k, masked=torch.empty_like(grad))
    del gen
    return rec.launches


# --- compiling a launch as the launcher would --------------------------------------------


def _candidates(launch: Launch):
    """(config name, kwargs incl. meta-parameters and options) for each config a launch may run."""
    from triton.runtime.autotuner import Autotuner

    if not isinstance(launch.kernel, Autotuner):
        yield "", dict(launch.kwargs)
        return
    tuner = launch.kernel
    named = dict(zip(tuner.fn.arg_names, launch.args))
    configs = tuner.configs
    if tuner.early_config_prune:
        configs = tuner.early_config_prune(tuner.configs, named, **launch.kwargs)
    for cfg in configs:
        kw = dict(launch.kwargs) | dict(cfg.kwargs)
        kw.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        yield config_tag(cfg), kw


def config_tag(cfg) -> str:
    """A ``triton.Config`` as this report and ``kernel_sweep.py`` name it: its meta
    values joined by ``x``, then warps and stages (``128x128x32x8w8s3``)."""
    return "x".join(str(v) for v in cfg.kwargs.values()) + f"w{cfg.num_warps}s{cfg.num_stages}"


def _programs(launch: Launch, kwargs: dict) -> int:
    grid = launch.grid
    if callable(grid):
        meta = dict(zip(launch.jit.arg_names, launch.args)) | kwargs
        grid = grid(meta)
    return math.prod(int(g) for g in grid)


def compile_launch(launch: Launch, kwargs: dict, arch: int):
    """``triton.compile`` of this launch's specialisation for ``sm_<arch>``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.jit
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)


# --- reading the generated code -----------------------------------------------------------


def _cuobjdump() -> str | None:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return tool if os.access(tool, os.X_OK) else None


def sass_of(cubin: bytes) -> tuple[str, str] | None:
    """(``cuobjdump -res-usage`` output, ``cuobjdump -sass`` listing), or None without the tool."""
    tool = _cuobjdump()
    return None if tool is None else _run_cuobjdump(tool, cubin)


# many launches of a report (the scores and top-k of every k, a config of several ks)
# compile to the same binary, and its SASS listing takes about 0.6 s on a 2-core machine
@functools.lru_cache(maxsize=256)
def _run_cuobjdump(tool: str, cubin: bytes) -> tuple[str, str]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    return res, sass


def mma_kind(ttir: str, ptx: str) -> str:
    """``wgmma`` / ``mma.sync`` (tensor cores), ``fma`` (a ``tl.dot`` on CUDA cores) or ``none``."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync\b", ptx):
        return "mma.sync"
    if "tt.dot" in ttir:
        return "fma"
    return "none"


#: a plain load of a 2-D floating-point tile: ``tt.load %ptrs, ... : tensor<RxCx!tt.ptr<bf16>, ...>``
_TILE_LOAD = re.compile(r"=\s*tt\.load\s[^:]*:\s*tensor<\d+x\d+x!tt\.ptr<(?:f16|bf16|f32)>")


def async_operand_loads(ttgir: str, mma: str) -> bool | None:
    """True when every 2-D floating-point tile the kernel loads comes through ``cp.async``
    (``ttg.async_copy_global_to_local``) or TMA, none through a plain ``tt.load``
    (a synchronous load that stalls the MMA on every step); None without an MMA."""
    if mma == "none":
        return None
    sync_tiles = [line for line in ttgir.splitlines() if "tt.load" in line and _TILE_LOAD.search(line)]
    async_ops = len(re.findall(r"async_copy_global_to_local|async_tma_copy_global_to_local|tt\.descriptor_load", ttgir))
    return async_ops > 0 and not sync_tiles


def inner_loop_spills(sass: str) -> int:
    """Spill instructions (``STL`` / ``LDL``) inside innermost loops of a SASS listing.

    A loop is a backward branch: the addresses from its target to the branch. An
    innermost loop holds no other loop. A value spilled once per outer iteration (per
    unit of a per-example program, say) costs one local load there; inside the innermost
    loop it would cost one per step of the main accumulation.
    """
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2)))
    loops = []
    for addr, text in ins:
        m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    inner = [(a, z) for a, z in loops if not any(a <= a2 and z2 <= z and (a2, z2) != (a, z) for a2, z2 in loops)]
    return sum(
        1 for addr, text in ins
        if re.search(r"\b(STL|LDL)\b", text) and any(a <= addr <= z for a, z in inner)
    )


def usage(compiled) -> dict:
    """Registers, stack bytes, spill instructions (``STL`` / ``LDL``; those inside an
    innermost loop apart) and shared memory."""
    out = {
        "regs": None, "spill_bytes": None, "spill_instructions": None, "inner_loop_spills": None,
        "smem_bytes": int(compiled.metadata.shared), "num_warps": int(compiled.metadata.num_warps),
        "num_stages": int(getattr(compiled.metadata, "num_stages", 0) or 0),
    }
    got = sass_of(compiled.asm["cubin"])
    if got is None:
        return out
    res, sass = got
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)", res)
    if m:
        out["regs"], out["spill_bytes"] = int(m.group(1)), int(m.group(2))
    out["spill_instructions"] = len(re.findall(r"\b(?:STL|LDL)\b", sass))
    out["inner_loop_spills"] = inner_loop_spills(sass)
    out["wgmma_wait0"] = len(re.findall(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x0", sass))
    # asynchronous copies from global memory (cp.async, TMA), and the most copy groups a
    # wait leaves in flight (``DEPBAR.LE SB0, n``: a software pipeline n + 1 stages deep)
    out["async_copy_instructions"] = len(re.findall(r"\b(?:LDGSTS|UTMALDG)\b", sass))
    depths = [int(d, 16) for d in re.findall(r"\bDEPBAR\.LE\s+SB0,\s*0x([0-9a-f]+)", sass)]
    out["async_copies_in_flight"] = max(depths, default=0)
    return out


# --- the work each kernel must do ---------------------------------------------------------


def _elem(t) -> int:
    return t.element_size() if isinstance(t, torch.Tensor) else 4


def work(launch: Launch) -> tuple[int, int]:
    """(bytes, FLOPs) a launch must move and do at the least: each operand read once,
    each result written once; FLOPs of its products (2 per multiply-add), 0 elsewhere."""
    a = dict(zip(launch.jit.arg_names, launch.args))
    name = launch.name
    t = {n: v for n, v in a.items() if isinstance(v, torch.Tensor)}

    def nbytes(*names):
        return sum(t[n].numel() * _elem(t[n]) for n in names if n in t)

    if name == "matmul.grad_input_kernel":
        M, N, K = a["M"], a["N"], a["K"]
        e = _elem(t["out_ptr"])
        return e * (M * K + K * N + M * N) + 8 * K, 2 * M * N * K
    if name == "matmul.grad_weight_kernel":
        M, N, K = a["M"], a["N"], a["K"]
        e = _elem(t["x_ptr"])
        if launch.kwargs.get("USE_WS"):  # fp32 partial sums of a split-K, to the workspace
            w = nbytes("ws_ptr")
        else:  # the dense grad_W, zero rows included
            w = nbytes("out_ptr")
        return e * (M * K + M * N) + w, 2 * M * N * K
    if name == "matmul.split_reduce_kernel":
        return nbytes("ws_ptr", "out_ptr"), 0
    if name == "matmul.gather_columns_kernel":  # G's columns (and with WITH_W, W's rows) read, written padded
        rows = 2 * nbytes("w_out_ptr") if launch.kwargs.get("WITH_W") else 0
        return 2 * nbytes("out_ptr") + rows + 8 * a["K"], 0
    if name == "scores.partial_kernel":
        return nbytes("g_ptr", "score_ptr", "bias_ptr"), 0
    if name == "scores.finish_kernel":
        return nbytes("part_abs_ptr", "part_sum_ptr", "score_ptr", "bias_ptr"), 0
    if name == "per_example.grad_input_kernel":  # grad_x[m] = sum_t G[m, idx[m, t]] W[idx[m, t], :]
        N, NOUT, K = a["N"], a["NOUT"], a["K"]
        M, e = t["idx_ptr"].shape[0], _elem(t["out_ptr"])
        return M * K * (e + 8) + min(M * K, NOUT) * N * e + M * N * e, 2 * M * K * N
    if name == "per_example.grad_weight_kernel":  # grad_W[j] = sum over the rows that kept j
        N, NOUT = a["N"], a["NOUT"]
        pairs, e = t["rows_ptr"].numel(), _elem(t["out_ptr"])
        M = t["x_ptr"].shape[0]
        return pairs * (4 + e) + M * N * e + NOUT * N * e, 2 * pairs * N
    if name in ("per_example.row_select_kernel", "per_example.row_topk_kernel"):
        # G read once (the resident kernel's second read of a row, and the streaming
        # one's four more, hit L1 / L2), k int64 indices a row, the masked copy of G
        M, e = t["g_ptr"].shape[0], _elem(t["g_ptr"])
        masked = M * a["N"] * e if launch.kwargs.get("WRITE_MASKED") else 0
        return M * a["N"] * e + 8 * M * a["K"] + masked, 0
    if name == "topk.topk_kernel":
        n = a["N"]
        zeroed = a["ZERO_N"] * _elem(t["zero_ptr"]) if launch.kwargs.get("ZERO_BLOCK") else 0
        if launch.kwargs.get("FROM_PARTS"):  # the scores' row slices in, the bias out
            return nbytes("s_ptr", "bias_ptr") + 8 * n + zeroed, 0
        return 4 * n + 8 * n + zeroed, 0
    if name in ("topk.radix_histogram_kernel", "topk.radix_write_kernel"):
        # the multi-program radix select: each launch reads the n fp32 scores once; each
        # of its P programs reads the 256-bin histograms of the rounds before (L2), the
        # histogram kernels add 256 counts per program and the last one stores a 257-entry
        # row per program; the write kernel reads two entries of every earlier program's
        # row and writes the k (+ n - k) int64 indices
        n, kk, kw = a["N"], a["K"], launch.kwargs
        bins = 1 << kw["RADIX_BITS"]
        programs = -(-n // kw["BLOCK"])
        if name == "topk.radix_histogram_kernel":
            r = kw["ROUND"]
            last = 4 * (bins + 1) * programs if r == 32 // kw["RADIX_BITS"] - 1 else 0
            return 4 * n + 4 * bins * programs * (r + 1) + last, 0
        rounds = 32 // kw["RADIX_BITS"]
        written = 8 * n if kw["WRITE_REST"] else 8 * kk
        return 4 * n + 4 * bins * rounds * programs + 4 * programs * (programs - 1) + written, 0
    return sum(nbytes(n) for n in t), 0


def roofline_us(nbytes: int, flops: int, dtype: torch.dtype) -> dict:
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "tf32")
    peaks = dict(GPU_PEAKS)
    return {
        gpu: round(1e6 * max(flops / (peaks[gpu][precision] * 1e12), nbytes / (peaks[gpu]["tb_s"] * 1e12)), 3)
        for gpu in ROOFLINE_GPUS
    }


# --- the report -------------------------------------------------------------------------


def report(shape, k: int, dtype: str = "bfloat16", mode: str = "unified", arch: int = 90,
           only: tuple[str, ...] | None = None) -> list[dict]:
    """One record per (launch, candidate config): see the module docstring. ``only``:
    report just the launches whose name (``file.kernel``) starts with one of these."""
    M, n_in, n_out = (int(s) for s in shape)
    dt = DTYPES[dtype]
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    records = []
    route = None
    if mode == "per-example":  # the route a backward of this shape takes on a GPU
        from meprop_triton import triton_ops

        route = triton_ops.per_example_route(M, n_out, int(k), dt)
    for i, launch in enumerate(record_backward(M, n_in, n_out, int(k), dt, mode, arch)):
        if only and not launch.name.startswith(tuple(only)):
            continue
        nbytes, flops = work(launch)
        for tag, kwargs in _candidates(launch):
            rec = {
                "launch": i, "name": launch.name, "config": tag or None,
                "arch": f"sm_{arch}", "shape": [M, n_in, n_out], "k": int(k), "dtype": dtype, "mode": mode,
            }
            if route is not None:
                rec["route"] = route
            try:
                compiled = compile_launch(launch, kwargs, arch)
            except Exception as e:  # reported, not raised: the report shows every launch
                rec["error"] = f"{type(e).__name__}: {e}"[:1000]
                records.append(rec)
                continue
            mma = mma_kind(compiled.asm["ttir"], compiled.asm["ptx"])
            rec.update(usage(compiled))
            rec.update(
                mma=mma,
                async_operand_loads=async_operand_loads(compiled.asm["ttgir"], mma),
                programs=_programs(launch, kwargs),
                sms=ARCH_SMS[arch],
                smem_fits=rec["smem_bytes"] <= SHARED_LIMIT[arch],
                bytes=int(nbytes), flops=int(flops),
                roofline_us=roofline_us(nbytes, flops, dt),
                error=None,
            )
            records.append(rec)
    return records


def table(records: list[dict]) -> str:
    cols = ["name", "config", "regs", "spill_bytes", "smem_bytes", "mma", "async_operand_loads", "programs", "bytes", "flops"]
    gpus = list(ROOFLINE_GPUS)
    head = cols + [f"{g} us" for g in gpus]
    rows = []
    for r in records:
        if r.get("error"):
            rows.append([r["name"], r.get("config") or "", "ERROR: " + r["error"][:80]])
            continue
        rows.append([str(r.get(c) if r.get(c) is not None else "-") for c in cols] + [str(r["roofline_us"][g]) for g in gpus])
    widths = [max([len(h), *(len(row[i]) for row in rows if i < len(row))]) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--arch", type=int, default=90, choices=sorted(ARCH_SMS))
    ap.add_argument("--shape", type=int, nargs=3, metavar=("M", "IN", "OUT"), default=[8192, 4096, 4096])
    ap.add_argument("--k", type=int, nargs="+", required=True, help="units kept (several: one report each)")
    ap.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=sorted(DTYPES))
    ap.add_argument("--mode", default="unified", choices=["unified", "per-example"])
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--only", nargs="+", metavar="PREFIX",
                    help="report only the launches whose name starts with one of these (e.g. topk.)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled", file=sys.stderr)
        return 2
    M, n_in, n_out = args.shape
    for k in args.k:
        if not 1 <= k <= n_out:
            print(f"--k must lie in [1, OUT={n_out}]; got {k}", file=sys.stderr)
            return 2
    records = []
    for dtype in args.dtype:
        for k in args.k:
            recs = report(args.shape, k, dtype, args.mode, args.arch, only=args.only)
            records += recs
            if args.json:  # written as it grows: a table that fails, or a cut-off run, keeps it
                with open(args.json, "w") as f:
                    json.dump(records, f, indent=1)
            print(f"sm_{args.arch}  M={M} in={n_in} out={n_out} k={k} {dtype} {args.mode}")
            if recs and recs[0].get("route") == "masked":
                print("(the products at this shape take the masked route on a GPU: the selection writes a "
                      "masked copy of G, its last row below, for cuBLAS GEMMs; the gather kernels shown are "
                      "those other shapes use)")
            print(table(recs))
            print()
    return 1 if any(r.get("error") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
