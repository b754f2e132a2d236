"""Every kernel and shipped config compiles for sm_80 and sm_90 and fits shared memory.

The builds run in one subprocess (tests/kernels/aot_build.py) with TRITON_INTERPRET
removed from its environment, so this works in the same pytest run as the interpreter
tests and on machines without a GPU. Triton's on-disk cache makes reruns fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

import aot_build  # noqa: E402
import kernel_checks  # noqa: E402

pytestmark = pytest.mark.aot

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

BUILDS = [(b, cc) for b in aot_build.builds() for cc in aot_build.ARCHS]


@pytest.fixture(scope="module")
def compiled():
    env = kernel_checks.compiled_env()
    proc = subprocess.run(
        [sys.executable, str(HERE / "aot_build.py"), "--jobs", str(min(4, os.cpu_count() or 1))],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )
    if proc.returncode != 0:
        pytest.fail(f"aot_build.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    recs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {r["id"]: r for r in recs}


@pytest.mark.parametrize("build,cc", BUILDS, ids=[f"{b['id']}-sm{cc}" for b, cc in BUILDS])
def test_compiles_and_fits(build, cc, compiled):
    rec = compiled.get(f"{build['id']}-sm{cc}")
    assert rec is not None, "no result from aot_build.py"
    assert rec["error"] is None, rec["error"]
    assert rec["num_warps"] == build["options"]["num_warps"]
    limit = aot_build.SHARED_LIMIT[cc]
    assert 0 <= rec["shared"] <= limit, f"needs {rec['shared']} B of shared memory; sm_{cc} has {limit}"


def _kept_by_autotuner(build, cc) -> bool:
    """False for matmul configs that matmul.keep_config drops for this dtype, precision
    and architecture under the installed triton."""
    import torch

    from meprop_triton.kernels import matmul

    kw = build["constexprs"]
    if not build["kernel"].startswith("matmul.grad_"):
        return True
    dtype = {"*fp32": torch.float32, "*fp16": torch.float16, "*bf16": torch.bfloat16}[build["signature"]["g_ptr"]]
    cfgs = (matmul.grad_input_configs if build["id"].startswith("grad_input") else matmul.grad_weight_configs)()
    return any(
        c.kwargs.items() <= kw.items()
        and matmul.keep_config(c, dtype, kw.get("INPUT_PRECISION"), (cc // 10, cc % 10), gather=kw.get("GATHER_G"))
        for c in cfgs
    )


def _usage(compiled, build, cc):
    rec = compiled.get(f"{build['id']}-sm{cc}")
    if rec is None or rec["error"] is not None:
        pytest.skip("not built (see test_compiles_and_fits)")
    if "stack" not in rec:
        pytest.skip("cuobjdump not available to read the register usage")
    return rec


FAST = [(b, cc) for b, cc in BUILDS if not b["id"].endswith("-unaligned")]


@pytest.mark.parametrize("build,cc", FAST, ids=[f"{b['id']}-sm{cc}" for b, cc in FAST])
def test_no_register_spills(build, cc, compiled):
    """No spill instruction inside an innermost loop (the main accumulation) of the
    aligned, unit-stride builds that the autotuner can pick, and of every scores / top-k
    build; at most 32 B of stack: ptxas of some triton releases saves a value or a few
    across an outer loop (8 B in top-k and 8-16 B in the per-example weight gradient
    under triton 3.6 or 3.8: stored before the loop, loaded once per outer step).

    Plain fp32 (ieee: FMA-based tl.dot) keeps only small tiles (matmul.keep_config); its
    64 x 64 tile on sm_80 has a 64-byte stack frame used in its main loop, tolerated for
    that slow path (tf32 is torch's GPU default for these products).
    """
    if not _kept_by_autotuner(build, cc):
        pytest.skip("pruned by the autotuner (matmul.keep_config)")
    rec = _usage(compiled, build, cc)
    kw = build["constexprs"]
    if kw.get("INPUT_PRECISION") == "ieee" and build["signature"].get("g_ptr") == "*fp32":
        assert rec["stack"] <= 64, f"{rec['registers']} registers, {rec['stack']} B stack frame"
        return
    assert rec["inner_loop_spills"] == 0, (
        f"{rec['inner_loop_spills']} spill instructions in an innermost loop "
        f"({rec['registers']} registers, {rec['stack']} B stack frame)"
    )
    assert rec["stack"] <= 32, f"{rec['registers']} registers, {rec['stack']} B stack frame"


def test_inner_loop_spills_are_found():
    """The SASS reading behind test_no_register_spills sees a spill in a loop."""
    sass = """
        /*0100*/                   STL [R1], R4 ;
        /*0110*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0120*/                   LDL R12, [R1] ;
        /*0130*/               @P0 BRA 0x110 ;
        /*0140*/                   LDL R13, [R1] ;
        /*0150*/               @P1 BRA 0x100 ;
        /*0160*/                   EXIT ;
    """
    assert aot_build.inner_loop_spills(sass) == 1  # the LDL at 0x120 only


UNALIGNED_GROUPS = sorted({
    (b["id"].split("-cfg")[0], b["id"].split("-", 3)[-1].rsplit("-", 1)[0], cc)
    for b, cc in BUILDS if b["id"].endswith("-unaligned")
})  # (kernel, "<dtype>[-tf32]-<gather|compact>", cc)


@pytest.mark.parametrize("kernel,variant,cc", UNALIGNED_GROUPS, ids=[f"{k}-{v}-sm{c}" for k, v, c in UNALIGNED_GROUPS])
def test_unaligned_shapes_have_a_spill_free_config(kernel, variant, cc, compiled):
    """Sizes / row strides not divisible by 16 (e.g. in = 129 or out = 500) load element
    by element and big tiles spill; at least one config the autotuner may pick must not."""
    group = [
        b for b, c in BUILDS
        if c == cc and b["id"].startswith(kernel + "-cfg") and b["id"].endswith(f"-{variant}-unaligned")
        and _kept_by_autotuner(b, cc)
    ]
    assert group
    stacks = {b["id"]: _usage(compiled, b, cc)["stack"] for b in group}
    assert min(stacks.values()) == 0, stacks


def test_every_shipped_config_is_built():
    """Every kernel and every config it ships has builds for every dtype it runs with."""
    from meprop_triton.kernels import matmul, scores, topk

    ids = {b["id"] for b in aot_build.builds()}
    for short, cfgs in (("grad_input", matmul.grad_input_configs()), ("grad_weight", matmul.grad_weight_configs())):
        for ci in range(len(cfgs)):
            for dt in ("bf16", "fp16", "fp32-tf32"):
                for mode in ("gather", "compact") if dt != "fp16" else ("gather",):
                    assert any(
                        i.startswith(f"{short}-cfg{ci}-") and f"-{dt}-{mode}-contig" in i for i in ids
                    ), (short, ci, dt, mode)
        kept = matmul.prune_configs(cfgs, {"g_ptr": __import__("torch").empty(0)}, INPUT_PRECISION="ieee")
        for ci, c in enumerate(cfgs):
            built = any(i.startswith(f"{short}-cfg{ci}-") and "-fp32-gather-contig" in i for i in ids)
            assert built == (c in kept), (short, ci)
    assert sum(i.startswith("scores.") for i in ids) == len(scores.configs()) * 3 * (2 * 2 + 1)
    single = [c for c in topk.configs() if not c["MULTI"]]
    multi = [c for c in topk.configs() if c["MULTI"]]
    assert single and multi
    # with and without the complement, contiguous and strided; the resident configs
    # above MAX_FROM_PARTS (the backward's selection there) also with the programs that
    # zero-fill a tensor beside it
    wide = [c for c in single if c["RESIDENT"] and c["BLOCK"] > topk.MAX_FROM_PARTS]
    assert wide
    assert sum(i.startswith("topk-") and not i.startswith("topk-parts-") for i in ids) == (len(single) + len(wide)) * 2 * 2
    assert sum(i.startswith("topk-") and i.endswith("-zero") for i in ids) == len(wide) * 2 * 2 + 2 * 3 * 2
    # the resident program finishing the scores' row slices (the 4096-key config): with
    # and without the complement, the bias in each dtype, one slice or several, with and
    # without the programs that zero-fill a tensor beside it
    resident = [c for c in single if c["RESIDENT"] and c["BLOCK"] == topk.MAX_FROM_PARTS]
    assert len(resident) == 1
    assert sum(i.startswith("topk-parts-") for i in ids) == len(resident) * 2 * 3 * 2 * 2
    assert sum(i.startswith("topk-parts-") and i.endswith("-zero") for i in ids) == len(resident) * 2 * 3 * 2
    # the multi-program select: a histogram kernel per digit round and the write kernel
    # with and without the complement, each contiguous and strided
    assert sum(i.startswith("topk_multi-hist") for i in ids) == sum(32 // c["RADIX_BITS"] for c in multi) * 2
    assert sum(i.startswith("topk_multi-write-") for i in ids) == len(multi) * 2 * 2
    assert sum(i.startswith("gather_columns-") for i in ids) == len(matmul.gather_configs()) * 3 * 2 * 2
    assert sum(i.startswith("split_reduce-") for i in ids) == len(matmul.reduce_configs()) * 3 * 2


def test_every_per_example_config_is_built():
    """kernels/per_example.py: every kernel, config and dtype has a build, ``contig``
    for every dtype and the general-stride ``strided`` one for fp32 and bf16."""
    from meprop_triton.kernels import per_example as pe

    ids = {b["id"] for b in aot_build.builds()}
    for dt in ("fp32", "fp16", "bf16"):
        specs = ("contig",) if dt == "fp16" else ("contig", "odd", "strided")
        for ci, c in enumerate(pe.select_configs()):
            short = "row_select" if c["RESIDENT"] else "row_topk"
            for spec in ("contig", "strided"):
                for tag in ("", "-masked"):  # the selection alone, and writing the masked copy of G
                    want = [i for i in ids if i.startswith(f"per_example.{short}-cfg{ci}-")
                            and i.endswith(f"-{dt}-{spec}") and ("-masked-" in i) == bool(tag)]
                    assert len(want) == 1, (short, ci, tag, dt, spec)
        for short, cfgs in (("grad_input", pe.grad_input_configs()), ("grad_weight", pe.grad_weight_configs())):
            for ci in range(len(cfgs)):
                for spec in specs:
                    assert any(
                        i.startswith(f"per_example.{short}-cfg{ci}-") and i.endswith(f"-{dt}-{spec}") for i in ids
                    ), (short, ci, dt, spec)
    for name in ("mark", "column_bits-count", "column_bits-place", "scan"):
        assert any(i.startswith(f"per_example.{name}-") for i in ids), name
