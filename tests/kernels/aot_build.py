"""Ahead-of-time builds of every kernel and shipped config for sm_80 / sm_90, no GPU needed.

``python tests/kernels/aot_build.py [--jobs N]`` compiles every build listed by
:func:`builds` with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``
and prints one JSON object per build (``id``, ``shared``, ``num_warps``, ``error``).
test_aot.py runs it in a subprocess without ``TRITON_INTERPRET`` (under the interpreter
``@triton.jit`` returns functions the compiler cannot take).

Matmul builds come in the specialisations a launch can get (the launcher makes an
operand with a non-unit inner stride contiguous first; which dtypes get which is in
:func:`_matmul_variants`; ``MEPROP_AOT_FULL=1`` builds all of them): ``contig`` --
unit inner strides as constants, 16-byte aligned pointers, sizes and row strides
divisible by 16 -- and ``unaligned`` -- unit inner strides and aligned pointers, but
sizes and row strides not divisible by 16 (such as in = 129 or out = 500) -- each
with G's columns gathered in the loads (``gather``) and with the compacted ``G[:, S]``
(``compact``). bf16 adds ``gather-gstrided``: ``contig`` except that G's two strides are
arbitrary (G is used as it comes: transposed, sliced or expanded). The scores and top-k kernels, which take any strides as they are,
are built ``contig`` and ``strided`` (no hints at all).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:  # run as a script: make ``bench`` importable
    sys.path.insert(0, _ROOT)

from bench.codegen import inner_loop_spills  # noqa: E402  (the SASS reading both use)

ARCHS = (80, 90)
#: bytes of shared memory a block may use (opt-in maximum): A100 164 KiB, H100 228 KiB
SHARED_LIMIT = {80: 167936, 90: 233472}

TL = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


def _build(kernel, name, ptrs, ints, constexprs, options, *, unit=(), aligned=False, aligned_ptrs=False,
           no_hint=(), hint=()):
    """One build: kernel, signature, constexprs, divisibility hints, compile options.

    ``unit``: stride arguments specialised to the constant 1 (what Triton does at launch
    for a stride equal to 1); ``aligned``: every pointer and the other int arguments
    carry the divisible-by-16 hint (16-byte aligned tensors, sizes multiple of 16);
    ``aligned_ptrs``: only the pointers do (torch allocations), no size or stride;
    ``no_hint``: arguments left without a hint either way; ``hint``: arguments hinted
    whatever the rest get (sizes the launcher pads to a multiple of 16).
    """
    sig = {}
    for p, t in ptrs.items():
        sig[p] = t
    for i in ints:
        sig[i] = "i32"
    const = dict(constexprs)
    for u in unit:
        const[u] = 1
    for c in const:
        sig[c] = "constexpr"
    hinted = (list(ptrs) + [i for i in ints if i not in unit]) if aligned else []
    if aligned_ptrs and not aligned:
        hinted = list(ptrs)
    hinted = [h for h in hinted if h not in no_hint]
    hinted += [h for h in hint if h not in hinted and h not in unit]
    return {
        "id": name,
        "kernel": kernel,
        "signature": sig,
        "constexprs": const,
        "divisible16": hinted,
        "options": options,
    }


def _matmul_variants(dt: str, prec: str, full: bool):
    """(specialisation, GATHER_G) pairs built for one matmul dtype.

    Default: every config for bf16 in every variant; fp32 (tf32) and fp16 aligned only
    (their shared memory is bf16's or, for fp32, the largest; register use is bf16's or
    lower for fp16); plain fp32 (the configs the autotuner keeps) aligned and unaligned.
    ``MEPROP_AOT_FULL=1``: every variant for every dtype.
    """
    every = [("contig", True), ("contig", False), ("unaligned", True), ("unaligned", False)]
    if full:
        return every + ([("gstrided", True)] if dt == "bf16" else [])
    if dt == "bf16":
        return every + [("gstrided", True)]
    if dt == "fp32" and prec == "ieee":
        return every
    if dt == "fp32":
        return [("contig", True), ("contig", False)]
    return [("contig", True)]


def builds() -> list[dict]:
    """Every build: kernel x shipped config x dtype x specialisation (x ARCHS when run).

    Needs only the config functions, not a compiler: the AOT tests parametrize on it.
    """
    import torch

    from meprop_triton.kernels import matmul, scores, topk

    out = []
    for c in scores.configs():
        p, f = c["partial"], c["finish"]
        for dt in ("fp32", "fp16", "bf16"):
            for final in (True, False):
                out.append(_build(
                    "scores.partial_kernel",
                    f"scores.partial-{dt}-{'final' if final else 'split'}-M{p['BLOCK_M']}N{p['BLOCK_N']}",
                    {"g_ptr": TL[dt], "score_ptr": "*fp32", "bias_ptr": TL[dt] if final else "*fp32"},
                    ["M", "N", "stride_gm", "stride_gn", "rows_per_split"],
                    {"BLOCK_M": p["BLOCK_M"], "BLOCK_N": p["BLOCK_N"], "FINAL": final},
                    {"num_warps": p["num_warps"]},
                    unit=("stride_gn",), aligned=True,
                ))
                out.append(_build(
                    "scores.partial_kernel",
                    f"scores.partial-{dt}-{'final' if final else 'split'}-M{p['BLOCK_M']}N{p['BLOCK_N']}-strided",
                    {"g_ptr": TL[dt], "score_ptr": "*fp32", "bias_ptr": TL[dt] if final else "*fp32"},
                    ["M", "N", "stride_gm", "stride_gn", "rows_per_split"],
                    {"BLOCK_M": p["BLOCK_M"], "BLOCK_N": p["BLOCK_N"], "FINAL": final},
                    {"num_warps": p["num_warps"]},
                ))
            out.append(_build(
                "scores.finish_kernel",
                f"scores.finish-{dt}-N{f['BLOCK_N']}",
                {"part_abs_ptr": "*fp32", "part_sum_ptr": "*fp32", "score_ptr": "*fp32", "bias_ptr": TL[dt]},
                ["N", "SPLIT"],
                {"BLOCK_N": f["BLOCK_N"]},
                {"num_warps": f["num_warps"]},
                aligned=True,
            ))
    for c in topk.configs():
        if c["MULTI"]:  # the multi-program radix select: its own two kernels
            hint = lambda strided: {} if strided else {"unit": ("stride_s",), "aligned": True}  # noqa: E731
            for strided in (False, True):
                tag = f"B{c['BLOCK']}R{c['RADIX_BITS']}{'-strided' if strided else ''}"
                for r in range(32 // c["RADIX_BITS"]):
                    out.append(_build(
                        "topk.radix_histogram_kernel",
                        f"topk_multi-hist{r}-{tag}",
                        {"s_ptr": "*fp32", "hist_ptr": "*i32", "ge_ptr": "*i32"},
                        ["N", "K", "stride_s"],
                        {"ROUND": r, "BLOCK": c["BLOCK"], "RADIX_BITS": c["RADIX_BITS"]},
                        {"num_warps": c["num_warps"]},
                        **hint(strided),
                    ))
                for rest in (True, False):
                    out.append(_build(
                        "topk.radix_write_kernel",
                        f"topk_multi-write-{'rest' if rest else 'norest'}-{tag}",
                        {"s_ptr": "*fp32", "hist_ptr": "*i32", "ge_ptr": "*i32", "idx_ptr": "*i64", "rest_ptr": "*i64"},
                        ["N", "K", "stride_s"],
                        {"BLOCK": c["BLOCK"], "RADIX_BITS": c["RADIX_BITS"], "SCAN_BLOCK": topk.SCAN_BLOCK,
                         "WRITE_REST": rest},
                        {"num_warps": c["num_warps"]},
                        **hint(strided),
                    ))
            continue
        for rest in (True, False):
            for strided in (False, True):
                # zero: with the programs that zero-fill a tensor beside the selection
                # (the cuBLAS route's grad_W above topk.MAX_FROM_PARTS units)
                for zero in (False, True) if c["RESIDENT"] and c["BLOCK"] > topk.MAX_FROM_PARTS else (False,):
                    out.append(_build(
                        "topk.topk_kernel",
                        f"topk-{'rest' if rest else 'norest'}-B{c['BLOCK']}C{c['CHUNK']}R{c['RADIX_BITS']}"
                        f"{'-resident' if c['RESIDENT'] else ''}{'-strided' if strided else ''}{'-zero' if zero else ''}",
                        {"s_ptr": "*fp32", "idx_ptr": "*i64", "rest_ptr": "*i64", "bias_ptr": "*fp32",
                         "zero_ptr": "*bf16" if zero else "*fp32"},
                        ["N", "K", "stride_s"] + (["ZERO_N"] if zero else []),
                        {"SPLIT": 1, **({} if zero else {"ZERO_N": 0}), "BLOCK": c["BLOCK"],
                         "RADIX_BITS": c["RADIX_BITS"], "WRITE_REST": rest, "RESIDENT": c["RESIDENT"],
                         "CHUNK": c["CHUNK"], "FROM_PARTS": False, "ZERO_BLOCK": topk.ZERO_BLOCK if zero else 0},
                        {"num_warps": c["num_warps"]},
                        **({} if strided else {"unit": ("stride_s",), "aligned": True}),
                    ))
            if not c["RESIDENT"] or c["BLOCK"] != topk.MAX_FROM_PARTS:
                continue
            # the scores' row slices finished in the program (topk_from_parts): one slice
            # (SPLIT specialised to 1) or several, the bias in each dtype; with the
            # programs that zero-fill a tensor of that dtype beside the selection
            # (zero=, the cuBLAS route's grad_W) or without
            for dt in ("fp32", "fp16", "bf16"):
                for one_slice in (False, True):
                    for zero in (False, True):
                        out.append(_build(
                            "topk.topk_kernel",
                            f"topk-parts-{dt}-{'rest' if rest else 'norest'}-B{c['BLOCK']}R{c['RADIX_BITS']}"
                            f"{'-1slice' if one_slice else ''}{'-zero' if zero else ''}",
                            {"s_ptr": "*fp32", "idx_ptr": "*i64", "rest_ptr": "*i64", "bias_ptr": TL[dt],
                             "zero_ptr": TL[dt]},
                            ["N", "K", "stride_s"] + ([] if one_slice else ["SPLIT"]) + (["ZERO_N"] if zero else []),
                            {**({"SPLIT": 1} if one_slice else {}), **({} if zero else {"ZERO_N": 0}),
                             "BLOCK": c["BLOCK"], "RADIX_BITS": c["RADIX_BITS"], "WRITE_REST": rest,
                             "RESIDENT": True, "CHUNK": c["BLOCK"], "FROM_PARTS": True,
                             "ZERO_BLOCK": topk.ZERO_BLOCK if zero else 0},
                            {"num_warps": c["num_warps"]},
                            unit=("stride_s",), aligned_ptrs=True,
                        ))
    mm = [
        ("matmul.grad_input_kernel", "grad_input", matmul.grad_input_configs(),
         ("g_ptr", "w_ptr", "out_ptr"), ("idx_ptr",),
         ["M", "N", "K", "KA", "stride_gm", "stride_gn", "stride_wo", "stride_wi", "stride_om", "stride_on"],
         ("stride_gn", "stride_wi", "stride_on")),
        ("matmul.grad_weight_kernel", "grad_weight", matmul.grad_weight_configs(),
         ("g_ptr", "x_ptr", "out_ptr"), ("idx_ptr", "rest_ptr"),
         ["M", "N", "K", "R", "KA", "SPLIT", "stride_gm", "stride_gn", "stride_xm", "stride_xi", "stride_wo",
          "stride_wi"],
         ("stride_gn", "stride_xi", "stride_wi")),
    ]
    full = os.environ.get("MEPROP_AOT_FULL", "0") not in ("", "0")
    f32 = torch.empty(0)
    for kernel, short, cfgs, fptrs, iptrs, ints, unit in mm:
        kept_ieee = matmul.prune_configs(cfgs, {"g_ptr": f32}, INPUT_PRECISION="ieee")
        for ci, cfg in enumerate(cfgs):
            kw = cfg.kwargs
            tag = f"M{kw['BLOCK_M']}N{kw['BLOCK_N']}K{kw['BLOCK_K']}w{cfg.num_warps}s{cfg.num_stages}"
            for dt, prec in (("fp32", "ieee"), ("fp32", "tf32"), ("fp16", "ieee"), ("bf16", "ieee")):
                if dt == "fp32" and prec == "ieee" and cfg not in kept_ieee:
                    continue  # the autotuner never runs it for plain fp32
                ptrs = {p: TL[dt] for p in fptrs} | {p: "*i64" for p in iptrs}
                if short == "grad_weight":
                    ptrs["ws_ptr"] = "*fp32"
                for spec, gather in _matmul_variants(dt, prec, full):
                    g_free = spec == "gstrided"  # G with any strides, the rest contig
                    const = dict(kw) | {"INPUT_PRECISION": prec, "GATHER_G": gather}
                    if short == "grad_weight":
                        # the compacted G goes with the split-K workspace here, the gather
                        # with direct stores: both code paths are built
                        const["USE_WS"] = not gather
                    out.append(_build(
                        kernel,
                        f"{short}-cfg{ci}-{tag}-{dt}{'-tf32' if prec == 'tf32' else ''}"
                        f"-{'gather' if gather else 'compact'}-{spec}",
                        ptrs, ints, const,
                        {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
                        unit=tuple(u for u in unit if not (g_free and u == "stride_gn")),
                        aligned=spec != "unaligned", aligned_ptrs=True,
                        no_hint=("stride_gm", "stride_gn") if g_free else (),
                        # the compacted G is padded to a width (and row stride) of a
                        # multiple of 16 whatever k is
                        hint=() if gather else ("KA", "stride_gm"),
                    ))
    for c in matmul.gather_configs():
        for dt in ("fp32", "fp16", "bf16"):
            for spec in ("contig", "strided"):
                for with_w in (False, True):  # W's rows gathered in the same launch (weight=)
                    out.append(_build(
                        "matmul.gather_columns_kernel",
                        f"gather_columns-{dt}-M{c['BLOCK_M']}K{c['BLOCK_K']}-{spec}{'-weight' if with_w else ''}",
                        {"g_ptr": TL[dt], "idx_ptr": "*i64", "out_ptr": TL[dt], "w_ptr": TL[dt], "w_out_ptr": TL[dt]},
                        ["M", "K", "KP", "NW", "stride_gm", "stride_gn", "stride_om", "stride_ok", "stride_wo",
                         "stride_wi"],
                        {"BLOCK_M": c["BLOCK_M"], "BLOCK_K": c["BLOCK_K"], "WITH_W": with_w,
                         "W_ROWS": c["W_ROWS"], "W_COLS": c["W_COLS"]},
                        {"num_warps": c["num_warps"]},
                        unit=("stride_gn", "stride_ok", "stride_wi") if spec == "contig" else (),
                        aligned=spec == "contig", hint=("KP",),
                    ))
    for c in matmul.reduce_configs():
        for dt in ("fp32", "fp16", "bf16"):
            for spec in ("contig", "odd"):
                out.append(_build(
                    "matmul.split_reduce_kernel",
                    f"split_reduce-{dt}-M{c['BLOCK_M']}N{c['BLOCK_N']}-{spec}",
                    {"ws_ptr": "*fp32", "idx_ptr": "*i64", "rest_ptr": "*i64", "out_ptr": TL[dt]},
                    ["N", "K", "R", "SPLIT", "stride_ws", "stride_wo", "stride_wi"],
                    {"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]},
                    {"num_warps": c["num_warps"]},
                    unit=("stride_wi",), aligned=spec == "contig", aligned_ptrs=True,
                ))
    out += _per_example_builds(full)
    return out


#: per_example kernel specialisations: ``contig`` (unit inner strides as constants,
#: everything divisible by 16), ``odd`` (unit inner strides, 16-byte aligned pointers,
#: sizes / row strides not divisible by 16, such as in = 129 or out = 500) and
#: ``strided`` (no hints, no unit stride: G as it comes -- transposed, sliced, expanded).
#: Default: every config for every dtype ``contig``; ``odd`` / ``strided`` for fp32 (the
#: widest loads) and bf16; ``MEPROP_AOT_FULL=1`` adds fp16 to those.
PE_SPECS = ("contig", "odd", "strided")


def _pe_spec_kwargs(spec: str, unit: tuple) -> dict:
    if spec == "contig":
        return {"unit": unit, "aligned": True}
    if spec == "odd":
        return {"unit": unit, "aligned_ptrs": True}
    return {}


def _per_example_builds(full: bool) -> list[dict]:
    """Every kernels/per_example.py kernel x shipped config x dtype x specialisation."""
    import torch

    from meprop_triton.kernels import per_example as pe

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    out = []

    def specs(dt):
        return PE_SPECS if (full or dt != "fp16") else PE_SPECS[:1]

    for dt in ("fp32", "fp16", "bf16"):
        for ci, c in enumerate(pe.select_configs()):
            for spec in ("contig", "strided"):
                for masked in (False, True):
                    tag = "-masked" if masked else ""
                    if c["RESIDENT"]:
                        kernel, short, consts = "per_example.row_select_kernel", "row_select", {
                            "BLOCK": c["BLOCK"], "CHUNK": c["CHUNK"], "KEY_BITS": 32 if dt == "fp32" else 16,
                            "INF_KEY": pe.KEY_INF[dtypes[dt]], "WRITE_MASKED": masked,
                        }
                        cfg = f"B{c['BLOCK']}C{c['CHUNK']}w{c['num_warps']}"
                    else:
                        kernel, short, consts = "per_example.row_topk_kernel", "row_topk", {
                            "BLOCK": c["BLOCK"], "RADIX_BITS": c["RADIX_BITS"], "WRITE_MASKED": masked,
                            "KEY_BITS": 32 if dt == "fp32" else 16, "INF_KEY": pe.KEY_INF[dtypes[dt]],
                        }
                        cfg = f"B{c['BLOCK']}R{c['RADIX_BITS']}"
                    out.append(_build(
                        kernel,
                        f"per_example.{short}-cfg{ci}-{cfg}{tag}-{dt}-{spec}",
                        {"g_ptr": TL[dt], "idx_ptr": "*i64", "masked_ptr": TL[dt]},
                        ["N", "K", "stride_gm", "stride_gn", "stride_im"],
                        consts,
                        {"num_warps": c["num_warps"]},
                        **_pe_spec_kwargs(spec, ("stride_gn",)),
                    ))
        for ci, c in enumerate(pe.grad_input_configs()):
            for spec in specs(dt):
                out.append(_build(
                    "per_example.grad_input_kernel",
                    f"per_example.grad_input-cfg{ci}-T{c['BLOCK_T']}N{c['BLOCK_N']}w{c['num_warps']}-{dt}-{spec}",
                    {"g_ptr": TL[dt], "w_ptr": TL[dt], "idx_ptr": "*i64", "out_ptr": TL[dt]},
                    ["N", "NOUT", "K", "stride_gm", "stride_gn", "stride_wo", "stride_wi",
                     "stride_im", "stride_ik", "stride_om", "stride_on"],
                    {"BLOCK_T": c["BLOCK_T"], "BLOCK_N": c["BLOCK_N"]},
                    {"num_warps": c["num_warps"]},
                    **_pe_spec_kwargs(spec, ("stride_gn", "stride_wi", "stride_ik", "stride_on")),
                ))
        for ci, c in enumerate(pe.grad_weight_configs()):
            for spec in specs(dt):
                out.append(_build(
                    "per_example.grad_weight_kernel",
                    f"per_example.grad_weight-cfg{ci}-J{c['BLOCK_J']}L{c['BLOCK_L']}N{c['BLOCK_N']}"
                    f"w{c['num_warps']}-{dt}-{spec}",
                    {"g_ptr": TL[dt], "x_ptr": TL[dt], "crow_ptr": "*i64", "rows_ptr": "*i32", "out_ptr": TL[dt]},
                    ["N", "NOUT", "stride_gm", "stride_gn", "stride_xm", "stride_xi", "stride_wo", "stride_wi"],
                    {"BLOCK_J": c["BLOCK_J"], "BLOCK_L": c["BLOCK_L"], "BLOCK_N": c["BLOCK_N"]},
                    {"num_warps": c["num_warps"]},
                    **_pe_spec_kwargs(spec, ("stride_gn", "stride_xi", "stride_wi")),
                ))
    for c in pe.lists_configs():
        mk, bc, sc = c["mark"], c["bits"], c["scan"]
        for spec in ("contig", "strided"):
            out.append(_build(
                "per_example.mark_kernel",
                f"per_example.mark-B{mk['BLOCK']}-{spec}",
                {"idx_ptr": "*i64", "bits_ptr": "*i32"},
                ["M", "NOUT", "K", "stride_im", "stride_ik"],
                {"BLOCK": mk["BLOCK"]},
                {"num_warps": mk["num_warps"]},
                **_pe_spec_kwargs(spec, ("stride_ik",)),
            ))
        for place in (False, True):
            for spec in ("contig", "odd"):
                out.append(_build(
                    "per_example.column_bits_kernel",
                    f"per_example.column_bits-{'place' if place else 'count'}-M{bc['BLOCK_M']}-{spec}",
                    {"bits_ptr": "*i32", "counts_ptr": "*i32", "crow_ptr": "*i64", "rows_ptr": "*i32"},
                    ["M", "NOUT"],
                    {"BLOCK_M": bc["BLOCK_M"], "PLACE": place},
                    {"num_warps": bc["num_warps"]},
                    **_pe_spec_kwargs(spec, ()),
                ))
        for spec in ("contig", "odd"):
            out.append(_build(
                "per_example.scan_kernel",
                f"per_example.scan-B{sc['BLOCK']}-{spec}",
                {"counts_ptr": "*i32", "crow_ptr": "*i64"},
                ["N"],
                {"BLOCK": sc["BLOCK"]},
                {"num_warps": sc["num_warps"]},
                **_pe_spec_kwargs(spec, ()),
            ))
    return out


def _compile_one(args):
    build, cc = args
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod_name, fn_name = build["kernel"].rsplit(".", 1)
    fn = getattr(importlib.import_module(f"meprop_triton.kernels.{mod_name}"), fn_name)
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in build["divisible16"]}
    src = ASTSource(fn=fn, signature=build["signature"], constexprs=build["constexprs"], attrs=attrs)
    rec = {"id": f"{build['id']}-sm{cc}", "shared": None, "num_warps": None, "error": None}
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(build["options"]))
        rec["shared"] = int(compiled.metadata.shared)
        rec["num_warps"] = int(compiled.metadata.num_warps)
        rec["name"] = compiled.metadata.name
        rec.update(_resource_usage(compiled.asm["cubin"]))
    except Exception as e:  # reported, the test fails with it
        rec["error"] = f"{type(e).__name__}: {e}"[:2000]
    return rec


def _resource_usage(cubin: bytes) -> dict:
    """Registers per thread and stack frame bytes from ``cuobjdump -res-usage`` (the one
    shipped with triton), and the spill instructions inside innermost loops from its
    ``-sass``; empty if it cannot be run.

    A spill (``STL`` / ``LDL``) addresses the thread's local memory: its stack frame
    (``STACK``) or static local arrays (``LOCAL``). A kernel with neither has no spill
    instruction, so its SASS (the costly part, about 0.6 s a kernel on a 2-core machine,
    against 0.01 s for the resource usage) is only read when it has one."""
    import re
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.access(tool, os.X_OK):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+)\s+STACK:(\d+)(?:.*?\bLOCAL:(\d+))?", out)
        if not m:
            return {}
        # no LOCAL field (another cuobjdump): read the SASS
        has_local = int(m.group(2)) > 0 or m.group(3) is None or int(m.group(3)) > 0
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout if has_local else ""
    return {"registers": int(m.group(1)), "stack": int(m.group(2)), "inner_loop_spills": inner_loop_spills(sass)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET for AOT builds", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the current default, stated
    work = [(b, cc) for b in builds() for cc in ARCHS]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            results = pool.map(_compile_one, work, chunksize=4)
            for rec in results:
                print(json.dumps(rec), flush=True)
    else:
        for w in work:
            print(json.dumps(_compile_one(w)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
