"""Each kernel of the unified Triton backward timed alone on a GPU, each GEMM under every
launch config its autotuner may try (and grad_W under several split-K factors), with
the config the autotuner picked: what to tune next, in one short run.

``python bench/kernel_sweep.py [--shape M IN OUT] [--k K] [--dtype D] [--json PATH]
[--dry-run]``

On a GPU every timing is the median of CUDA events around calls with L2 flushed and a
spin before each that outlasts the call's host side (``bench/timing.py``, as the
benchmarks time). Every config's output is checked against a float32 torch product of the same
selection before it is timed, so a config that computes wrong numbers shows as such,
not as a fast one. The first H200 run (bench/results/gpu-h200-2026-12-04) timed the
kernels of the target shape (8192 x 4096 -> 4096, bf16, k = 205) at 2-4x their roofline
estimates, with no record of the configs the autotuner chose; this tool is the next
GPU session's first step. ``--dry-run`` runs the same steps on a CPU under Triton's
interpreter at a tiny shape (timings meaningless; the checks are not): CI runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

DRY_SHAPE = (48, 64, 80)
DRY_K = 7


def _args(argv):
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--shape", type=int, nargs=3, metavar=("M", "IN", "OUT"), default=None)
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                    help="default bfloat16 (float32 in a dry run: the interpreter's bf16 dot is not exact)")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--dry-run", action="store_true",
                    help="a tiny shape on a CPU under Triton's interpreter (checks the tool, times nothing)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = _args(argv)
    if args.dry_run:  # before triton is imported: the kernels are built for the interpreter
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["MEPROP_TRITON_TEST_CONFIG"] = "1"
    if __package__ in (None, ""):
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch

    M, n_in, n_out = args.shape or (DRY_SHAPE if args.dry_run else (8192, 4096, 4096))
    k = args.k if args.k is not None else (DRY_K if args.dry_run else max(1, round(0.05 * n_out)))
    if not 1 <= k <= n_out:
        print(f"k must lie in [1, OUT={n_out}]; got {k}", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("kernel_sweep.py times kernels on a CUDA GPU; none is here (--dry-run checks the tool on a CPU)",
              file=sys.stderr)
        return 2
    dtype = args.dtype or ("float32" if args.dry_run else "bfloat16")
    print(f"unified backward kernels, M={M} in={n_in} out={n_out} k={k} {dtype}"
          f"{' (dry run: interpreter, timings meaningless)' if args.dry_run else ''}", flush=True)
    rows: list[dict] = []
    stopped = None
    try:  # each row printed as it is measured; the JSON written however the sweep ends
        sweep(M, n_in, n_out, k, getattr(torch, dtype), dry=args.dry_run, rows=rows,
              emit=lambda r: print(table([r], summary=False).splitlines()[-1], flush=True))
    except KeyboardInterrupt:  # gpu_run.sh's time cap: keep what was measured
        stopped = "stopped by an interrupt (a time cap) before the end"
    except Exception as e:  # noqa: BLE001 - a CUDA fault: keep the rows before it
        stopped = f"stopped by {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    finally:
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"rows": rows, "stopped": stopped}, f, indent=1)
    print(table(rows))
    if stopped:
        print(f"kernel_sweep.py: {stopped}; {len(rows)} rows kept", file=sys.stderr)
    bad = [r for r in rows if r.get("ok") is False]
    for r in bad:
        print(f"WRONG NUMBERS: {r['kernel']} {r['config']}: max error {r['max_err']} (allowed {r['tol']})",
              file=sys.stderr)
    return 1 if bad or stopped else 0


def sweep(M: int, n_in: int, n_out: int, k: int, dtype, *, dry: bool = False,
          rows: list | None = None, emit=None) -> list[dict]:
    """One row per timed call: ``kernel``, ``config``, ``us``, ``tflops``, ``gbps`` and,
    where there is something to check, ``max_err`` / ``tol`` / ``ok`` (the GEMMs against
    a float32 torch product, the selection's candidates against a torch column sum or
    the shipped config's selection), or ``error`` for a candidate that did not build or
    run. Appended to ``rows`` (returned) as each is measured, each passed to ``emit``."""
    import torch

    from bench.codegen import config_tag, forced
    from meprop_triton import triton_ops
    from meprop_triton.kernels import _launch
    from meprop_triton.kernels import matmul as mm

    rows = [] if rows is None else rows
    device = torch.device("cpu" if dry else "cuda")
    if not dry:  # the autotuner's own choice for the whole backward, whatever the environment says
        _launch.FORCE_SINGLE_CONFIG = False
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(M, n_out, generator=gen).to(device=device, dtype=dtype)
    x = torch.randn(M, n_in, generator=gen).to(device=device, dtype=dtype)
    weight = torch.randn(n_out, n_in, generator=gen).to(device=device, dtype=dtype)
    elem = grad.element_size()
    timed = _timer(device, dry)

    def add(r):
        rows.append(r)
        if emit is not None:
            emit(r)

    def row(kernel, config, us, flops=0, nbytes=0, **more):
        add(dict(kernel=kernel, config=config, us=round(us, 2),
                 tflops=round(flops / us / 1e6, 1) if flops else None,
                 gbps=round(nbytes / us / 1e3, 1) if nbytes else None, **more))

    def attempt(kernel, config, run, checked, flops=0, nbytes=0):
        """Run once (compiling) and check, then time; a candidate that fails to build or
        run (shared memory, registers, a fault) is a row with its error."""
        try:
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()  # an asynchronous fault belongs to this candidate
            result = checked()
        except Exception as e:  # noqa: BLE001 - an exploratory config may not build here
            add(dict(kernel=kernel, config=config, us=None, tflops=None, gbps=None,
                     error=f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"))
            if device.type == "cuda" and "illegal" in str(e).lower():
                raise  # the CUDA context is lost: nothing after this can run
            return
        row(kernel, config, timed(run), flops, nbytes, **result)

    idx, rest, _ = triton_ops.select_units(grad, k, return_rest=True, traceable=False)
    g_sel = mm.gather_columns(grad, idx)
    KP = g_sel.shape[1]
    g_k = grad.float()[:, idx]
    ref_x = g_k @ weight.float()[idx]
    ref_w = torch.zeros(n_out, n_in, device=device)
    ref_w[idx] = g_k.t() @ x.float()
    # bf16 / fp16 results round to 8 / 11 bits; sums of k or M products of unit normals
    tol = {torch.float32: 1e-3, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]

    def check(out, ref, rel=tol):
        err = (out.float() - ref).abs().max().item()
        allowed = rel * max(1.0, ref.abs().max().item())
        return dict(max_err=err, tol=allowed, ok=bool(err <= allowed))  # NaN fails

    # selection as the backward runs it (scores, then top-k with the rest), compaction
    row("selection (scores + top-k)", "-",
        timed(lambda: triton_ops.select_units(grad, k, return_rest=True, traceable=False)), nbytes=M * n_out * elem)
    _selection_sweep(grad, k, idx, attempt, check)
    row("compaction G[:, S]", "-", timed(lambda: mm.gather_columns(grad, idx)), nbytes=M * (k + KP) * elem)
    row("compaction G[:, S] and W[S]", "one launch (cuBLAS route)",
        timed(lambda: mm.gather_columns(grad, idx, weight=weight)), nbytes=(M + n_in) * (k + KP) * elem)

    capability = _launch.capability(device)
    smem = _launch.shared_memory_limit(device)
    precision = mm.input_precision_for(dtype)
    flops = 2 * M * k * n_in

    def candidates(shipped, extra):
        """Shipped configs the autotuner may try here, then exploratory ones it does not
        have (marked), each kept only where :func:`keep_config` allows it."""
        for cfg, tag in [(c, "") for c in shipped] + [(c, " (not shipped)") for c in extra]:
            if mm.keep_config(cfg, dtype, precision, capability, smem=smem):
                yield cfg, tag

    out_x = torch.empty((M, n_in), device=device, dtype=dtype)
    for cfg, tag in candidates(mm.grad_input_configs(), _extra(*EXTRA_GRAD_INPUT_SPECS)):
        def run_x(cfg=cfg):
            return mm.gathered_grad_input(grad, weight, idx, grad_selected=g_sel, out=out_x, config=cfg)
        out_x.fill_(float("nan"))  # a config that writes nothing cannot pass
        attempt("grad_x GEMM", config_tag(cfg) + tag, run_x, lambda: check(out_x, ref_x),
                flops, (M * KP + k * n_in + M * n_in) * elem)

    out_w = torch.empty((n_out, n_in), device=device, dtype=dtype)
    default_split = mm.weight_split(M, k, n_in, device)
    splits = sorted({1, default_split, min(mm.MAX_SPLIT, 2 * default_split)})
    for cfg, tag in candidates(mm.grad_weight_configs(), _extra(*EXTRA_GRAD_WEIGHT_SPECS)):
        for split in splits:
            def run_w(cfg=cfg, split=split):
                return mm.scattered_grad_weight(grad, x, idx, rest, grad_selected=g_sel, out=out_w,
                                                config=cfg, split=split)
            nbytes = (M * KP + M * n_in + n_out * n_in) * elem + (2 * split * k * n_in * 4 if split > 1 else 0)
            out_w.fill_(float("nan"))
            attempt("grad_W GEMM + zero rows",
                    f"{config_tag(cfg)} split {split}" + (" (default)" if split == default_split else "") + tag,
                    run_w, lambda: check(out_w, ref_w), flops, nbytes)

    # the cuBLAS route of triton_ops.UNIFIED_GEMMS on the same compacted operands
    compacted = mm.gather_columns(grad, idx, weight=weight)
    got = {}

    def cublas(which, need_x, need_w):
        def run():
            got[which] = triton_ops._cublas_products(grad, x, weight, idx, need_x, need_w, compacted=compacted)
        return run

    attempt("grad_x, cuBLAS route", "mm", cublas("x", True, False),
            lambda: check(got["x"][0], ref_x), flops, (M * KP + KP * n_in + M * n_in) * elem)
    attempt("grad_W, cuBLAS route", "mm + zeros + index_copy_", cublas("w", False, True),
            lambda: check(got["w"][1], ref_w), flops, (M * KP + M * n_in + 2 * k * n_in + n_out * n_in) * elem)

    for route in ("triton", "cublas"):
        with forced(triton_ops, "UNIFIED_GEMMS", route):
            whole = timed(lambda: triton_ops.unified_topk_backward(grad, x, weight, k))
        more = {}
        if not dry and route == "triton":  # what the autotuner chose, now that it ran
            for which in ("grad_input", "grad_weight"):
                cache = getattr(mm._autotuned(which), "cache", {})
                more[f"autotuned_{which}"] = sorted({config_tag(c) for c in cache.values()})
        label = "Triton GEMMs, autotuned" if route == "triton" else "cuBLAS GEMMs"
        row(f"whole backward ({label})", "-", whole, 2 * flops, **more)
    _per_example_sweep(grad, x, weight, k, attempt, row, timed)
    row("dense grad_x (cuBLAS)", "-", timed(lambda: grad @ weight), 2 * M * n_out * n_in)
    row("dense grad_W (cuBLAS)", "-", timed(lambda: grad.t() @ x), 2 * M * n_out * n_in)
    return rows


def _timer(device, dry: bool):
    """Microseconds of one call: on a GPU the median of CUDA events around each call with
    L2 flushed and a spin before it that outlasts the call's host side
    (``bench/timing.py``, as the benchmarks time); ``triton.testing.do_bench`` has only
    its L2 flush ahead of each call, shorter than the backward's Python there. In a dry
    run, one call's wall time."""
    if dry:
        def timed(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e6
        return timed

    from bench.timing import cuda_median_seconds

    def timed(fn):
        return cuda_median_seconds(fn, device) * 1e6
    return timed


def _extra(*specs):
    import triton

    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=st)
            for bm, bn, bk, w, st in specs]


#: Exploratory GEMM configs the autotuners do not have (BLOCK_M, BLOCK_N, BLOCK_K, warps,
#: stages): larger tiles and deeper K steps. grad_x's reduction is only k (~208) deep, so
#: each output tile is mostly its epilogue; grad_W's tile is bounded for its split-K.
EXTRA_GRAD_INPUT_SPECS = [(256, 128, 64, 8, 3), (128, 128, 128, 8, 2), (128, 256, 128, 8, 2), (64, 256, 64, 4, 3)]
EXTRA_GRAD_WEIGHT_SPECS = [(128, 128, 64, 8, 4), (64, 256, 64, 8, 3), (128, 64, 128, 8, 3)]


#: Candidate blocks of the scores' first pass (BLOCK_M, BLOCK_N, num_warps): it reads G
#: once and is bandwidth-bound; the H200 run timed the shipped 32 x 128 x 4 warps at
#: 1.6 TB/s, a third of the copy bandwidth.
SCORE_BLOCKS = [(32, 128, 4), (32, 256, 4), (64, 128, 4), (64, 256, 8), (16, 512, 4), (32, 512, 8), (128, 128, 8)]
#: Candidate warp counts of the resident top-k program (its radix select took 37 us at
#: 4,096 units on the H200, one program; it now counts one bit a round). With 4 warps
#: (32 keys a thread) its sm_90 build spills.
TOPK_WARPS = [8, 16]


def _selection_sweep(grad, k: int, idx, attempt, check) -> None:
    """The scores' first pass under :data:`SCORE_BLOCKS` and the top-k program under
    :data:`TOPK_WARPS` (where the units fit it), each through ``attempt``: the partial
    sums checked against a float32 torch column sum, the selection against the shipped
    config's (exactly)."""
    import torch

    from meprop_triton.kernels import scores as sc
    from meprop_triton.kernels import topk as tk

    M, n = grad.shape
    ref = grad.float().abs().sum(0)
    shipped_scores, shipped_topk = sc.configs, tk.configs
    base = shipped_scores()
    nbytes = M * n * grad.element_size()
    try:
        for bm, bn, warps in SCORE_BLOCKS:
            cand = [{"partial": {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps}, "finish": base[0]["finish"]}]
            sc.configs = lambda cand=cand: cand
            split = sc._slices(M, n, None, grad.device)[0]
            got = {}
            attempt("column scores, first pass", f"{bm}x{bn} w{warps} split {split}"
                    + (" (shipped)" if cand[0]["partial"] == base[0]["partial"] else ""),
                    lambda got=got: got.update(parts=sc.column_score_parts(grad)),
                    lambda got=got: check(got["parts"][0].sum(0), ref, rel=1e-4), nbytes=nbytes)
        sc.configs = shipped_scores
        if n <= tk.MAX_FROM_PARTS:
            parts = sc.column_score_parts(grad)
            bias = torch.empty(n, dtype=grad.dtype, device=grad.device)
            listed = shipped_topk()
            for warps in TOPK_WARPS:
                cand = [dict(c) for c in listed]
                cand[1].update(num_warps=warps)
                tk.configs = lambda cand=cand: cand
                got = {}

                def same(got=got):
                    ok = bool(torch.equal(got["idx"][0], idx))
                    return dict(max_err=0.0 if ok else None, tol=0.0, ok=ok)

                shipped = warps == listed[1]["num_warps"]
                attempt("top-k program (from parts)", f"w{warps}" + (" (shipped)" if shipped else ""),
                        lambda got=got: got.update(idx=tk.topk_from_parts(parts, k, bias, return_rest=True)),
                        same, nbytes=parts.numel() * 4)
    finally:
        sc.configs, tk.configs = shipped_scores, shipped_topk
    # The same selection from finished scores under every config that holds them: the
    # counting search of the resident program beside the radix select's histograms (one
    # program streaming, or several programs), side by side in one run.
    scores = sc.column_scores_and_bias(grad)[0]
    rule = tk.pick_config(n)
    for cfg in tk.configs():
        if cfg["RESIDENT"] and n > cfg["BLOCK"]:
            continue
        kind = ("counting, resident" if cfg["RESIDENT"] else "radix, " + ("multi-program" if cfg["MULTI"] else "one program"))
        got = {}

        def same(got=got):
            ok = bool(torch.equal(got["idx"][0], idx))
            return dict(max_err=0.0 if ok else None, tol=0.0, ok=ok)

        attempt("top-k of finished scores", f"{kind} B{cfg['BLOCK']} C{cfg['CHUNK']} w{cfg['num_warps']}"
                + (" (rule)" if cfg == rule else ""),
                lambda got=got, cfg=cfg: got.update(idx=tk.topk_indices(scores, k, return_rest=True, config=cfg)),
                same, nbytes=n * 4)


def _per_example_sweep(grad, x, weight, k: int, attempt, row, timed) -> None:
    """Per-example top-k at the same k: the per-row selection under every select config
    that holds the row (the resident ones) and the streaming one, each checked against
    ``reference.per_example_topk_indices`` exactly (G has no NaN); the same launch also
    writing the masked copy of G; the whole per-example backward on its route."""
    import torch

    from meprop_triton import reference, triton_ops
    from meprop_triton.kernels import per_example as pe

    M, n = grad.shape
    want = reference.per_example_topk_indices(grad, k)
    shipped = pe.pick_select_config(n)
    elem = grad.element_size()
    for cfg in pe.select_configs():
        if cfg["RESIDENT"] and n > cfg["BLOCK"]:
            continue
        got = {}

        def same(got=got):
            ok = bool(torch.equal(got["idx"], want))
            return dict(max_err=0.0 if ok else None, tol=0.0, ok=ok)

        tag = (f"resident {cfg['BLOCK']} w{cfg['num_warps']}" if cfg["RESIDENT"]
               else f"streaming {cfg['BLOCK']} radix {cfg['RADIX_BITS']} w{cfg['num_warps']}")
        attempt("per-example row top-k", tag + (" (shipped)" if cfg == shipped else ""),
                lambda cfg=cfg, got=got: got.update(idx=pe.row_topk_indices(grad, k, config=cfg)),
                same, nbytes=M * n * elem + 8 * M * k)
    masked = torch.empty_like(grad)
    got = {}

    def same_masked():
        want_m = torch.zeros_like(grad).scatter_(1, want, grad.gather(1, want))
        ok = bool(torch.equal(got["idx"], want)) and bool(torch.equal(masked, want_m))
        return dict(max_err=0.0 if ok else None, tol=0.0, ok=ok)

    attempt("per-example row top-k", "+ masked copy of G (masked route)",
            lambda: got.update(idx=pe.row_topk_indices(grad, k, masked=masked)),
            same_masked, nbytes=2 * M * n * elem + 8 * M * k)
    route = triton_ops.per_example_route(M, n, k, grad.dtype)
    us = timed(lambda: triton_ops.per_example_topk_backward(grad, x, weight, k))
    row(f"whole per-example backward ({route} route)", "-", us, 4 * M * n * x.shape[1] if route == "masked" else 0)


def table(rows: list[dict], summary: bool = True) -> str:
    head = f"{'kernel':28s} {'config':48s} {'us':>9s} {'TFLOP/s':>8s} {'GB/s':>8s}  check"
    lines = [head, "-" * len(head)]
    for r in rows:
        chk = "" if "ok" not in r else ("ok" if r["ok"] else f"WRONG (max error {r['max_err']})")
        extra = "; ".join(f"{key}: {', '.join(v)}" for key, v in r.items() if key.startswith("autotuned_"))
        if r.get("error"):
            lines.append(f"{r['kernel']:28s} {r['config']:48s} {'-':>9s} {'-':>8s} {'-':>8s}  failed: {r['error']}")
            continue
        lines.append(f"{r['kernel']:28s} {r['config']:48s} {r['us']:9.1f} "
                     f"{r['tflops'] if r['tflops'] is not None else '-':>8} "
                     f"{r['gbps'] if r['gbps'] is not None else '-':>8}  {chk}{'  ' + extra if extra else ''}")
    if not summary:
        return "\n".join(lines)
    names = ("grad_x", "grad_W", "column scores", "top-k", "per-example row top-k")
    gemms = [r for r in rows if r.get("ok") and r["kernel"].startswith(names)]
    for name in names:
        best = min((r for r in gemms if r["kernel"].startswith(name)), key=lambda r: r["us"], default=None)
        if best is not None:
            lines.append(f"fastest {name}: {best['config']} ({best['us']:.1f} us)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
