"""The unified backward's code generation for Hopper at the target shape (issue 13).

``bench/codegen.py`` records the launches a real backward makes at M = 8192,
in = out = 4096 and compiles each with the specialisation Triton's launcher would give
it (k = 41 or 205 is not a multiple of 16, and so on), for every config the autotuner
may pick on sm_90. Here, for bf16 and fp16 and k in {41, 205, 410, 1024}:

* both GEMMs (grad_x and grad_W) run on ``wgmma``, their main-loop operand tiles
  loaded asynchronously (cp.async / TMA), with no register spills;
* every kernel fits the 227 KiB of shared memory a block may use;
* grad_W (with its split-K) launches at least one program per SM (132) at k = 205.

The compiles run in a subprocess without ``TRITON_INTERPRET`` (the kernel tests run
under the interpreter, whose kernels cannot be compiled).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

import kernel_checks  # noqa: E402

pytestmark = pytest.mark.aot

ROOT = Path(__file__).resolve().parents[2]
KS = (41, 205, 410, 1024)
DTYPES = ("bfloat16", "float16")
GEMMS = ("matmul.grad_input_kernel", "matmul.grad_weight_kernel")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("codegen") / "sm90.json"
    env = kernel_checks.compiled_env()
    cmd = [
        sys.executable, str(ROOT / "bench" / "codegen.py"), "--arch", "90", "--shape", "8192", "4096", "4096",
        "--k", "1", *map(str, KS), "--dtype", *DTYPES, "--json", str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        pytest.fail(f"bench/codegen.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def _of(records, dtype, k, name=None):
    recs = [r for r in records if r["dtype"] == dtype and r["k"] == k and (name is None or r["name"] == name)]
    assert recs, (dtype, k, name)
    return recs


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemms_use_wgmma_with_async_loads(records, dtype, k):
    for name in GEMMS:
        for r in _of(records, dtype, k, name):
            what = f"{name} {r['config']}"
            assert r["error"] is None, r["error"]
            assert r["mma"] == "wgmma", what
            assert r["async_operand_loads"] is True, what


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_no_spills_and_shared_memory_fits(records, dtype, k):
    for r in _of(records, dtype, k):
        what = f"{r['name']} {r['config']}"
        assert r["error"] is None, r["error"]
        assert r["smem_fits"] and r["smem_bytes"] <= 232448, what
        if r["spill_bytes"] is None:
            pytest.skip("cuobjdump not available to read the register usage")
        assert r["spill_bytes"] == 0 and r["spill_instructions"] == 0, what


@pytest.mark.parametrize("dtype", DTYPES)
def test_scores_stream_g_through_a_pipeline(records, dtype):
    """The scores' pass over G (the one read of G the selection makes) is a software
    pipeline: cp.async copies of G's tiles, later steps' copies in flight while a step is
    added up (a plain loop leaves one or two 16-byte loads in flight per thread)."""
    for r in _of(records, dtype, 205, "scores.partial_kernel"):
        if r.get("async_copy_instructions") is None:
            pytest.skip("cuobjdump not available to read the SASS")
        assert r["async_copy_instructions"] > 0, r
        assert r["async_copies_in_flight"] >= 2, r


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_weight_fills_the_gpu_at_5_percent(records, dtype):
    for r in _of(records, dtype, 205, "matmul.grad_weight_kernel"):
        assert r["programs"] >= 132, f"{r['config']}: {r['programs']} programs"


@pytest.mark.parametrize("dtype", DTYPES)
def test_k1_every_launch_compiles(records, dtype):
    """k = 1: the size arguments equal to 1 become constants at launch (the split-K at its
    largest, 16 slices); every launch still compiles, without spills."""
    recs = _of(records, dtype, 1)
    for r in recs:
        assert r["error"] is None, f"{r['name']} {r['config']}: {r['error']}"
        assert (r["spill_bytes"] or 0) <= 32, f"{r['name']} {r['config']}: {r['spill_bytes']} B"
    assert "matmul.split_reduce_kernel" in {r["name"] for r in recs}


def test_every_launch_is_reported(records):
    """One backward's launches: scores (+ finish), top-k, the compaction, both GEMMs and
    (with split-K) the reduction; each record has the fields the CLI documents."""
    names = {r["name"] for r in _of(records, "bfloat16", 205)}
    assert names >= {"scores.partial_kernel", "topk.topk_kernel", "matmul.gather_columns_kernel", *GEMMS}
    for r in records:
        for key in ("name", "regs", "spill_bytes", "smem_bytes", "mma", "async_operand_loads", "programs",
                    "bytes", "flops", "roofline_us"):
            assert key in r, key
        assert set(r["roofline_us"]) == {"H100", "H200"}
        assert r["roofline_us"]["H200"] <= r["roofline_us"]["H100"]


@pytest.mark.parametrize("k,route", [(5, "gather"), (40, "masked")])
def test_per_example_mode_reports_its_kernels(tmp_path, k, route):
    """``--mode per-example`` records the per-example launches, and which route the
    products take on a GPU at the shape: the gather kernels at k = 5 of 4,096 units
    (below 1/600 in bf16, ``triton_ops.per_example_route``); at k = 40 the masked copy and
    cuBLAS, where the report still shows the gather kernels' code (and runs no torch op
    on the indices of a launch it only recorded), and the selection's launch that writes
    the masked copy. The rows of 4,096 units are selected in registers (the resident
    kernel), with no spill."""
    out = tmp_path / "pe.json"
    env = kernel_checks.compiled_env()
    cmd = [
        sys.executable, str(ROOT / "bench" / "codegen.py"), "--arch", "90", "--shape", "1024", "512", "4096",
        "--k", str(k), "--mode", "per-example", "--json", str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    recs = json.loads(out.read_text())
    names = {r["name"] for r in recs}
    assert {"per_example.row_select_kernel", "per_example.grad_input_kernel", "per_example.grad_weight_kernel"} <= names
    selects = [r for r in recs if r["name"] == "per_example.row_select_kernel"]
    assert [r["programs"] for r in selects] == [1024] * (2 if route == "masked" else 1)
    e = 2  # bf16
    assert sorted(r["bytes"] for r in selects) == sorted(
        1024 * 4096 * e + 8 * 1024 * k + (1024 * 4096 * e if i else 0) for i in range(len(selects))
    )
    for r in recs:
        # at most the few bytes ptxas of some releases keeps across an outer loop (the AOT
        # tests' rule: 8 B in the per-example grad_W under triton 3.8)
        assert r["error"] is None and (r["spill_bytes"] or 0) <= (0 if "select" in r["name"] else 32), r
        assert r["route"] == route
        if r["name"] == "per_example.grad_input_kernel":
            assert r["flops"] == 2 * 1024 * k * 512
    assert ("masked route" in proc.stdout) == (route == "masked")


WIDE = [(90, 8192, 410), (80, 16384, 820), (80, 65536, 3277)]


@pytest.mark.parametrize("arch,n_out,k", WIDE, ids=[f"sm{a}-out{n}-k{k}" for a, n, k in WIDE])
def test_wide_layers_select_without_spills(tmp_path, arch, n_out, k):
    """out > 4096 (the paper's 8192-unit layers and wider): the backward selects in one
    program with its keys in registers up to MAX_RESIDENT units, and with the
    multi-program radix select beyond (a histogram launch per digit round and the write
    launch, one program per 1024 scores); no spill in an innermost loop and at most 32 B
    of stack, the rule of test_aot.py::test_no_register_spills (ptxas of triton 3.7 keeps
    8 B of the sm_80 write pass's state on the stack across its outer loop; ``--only
    topk.``: the GEMMs are checked above)."""
    from meprop_triton.kernels.topk import MAX_RESIDENT

    out = tmp_path / "wide.json"
    env = kernel_checks.compiled_env()
    cmd = [
        sys.executable, str(ROOT / "bench" / "codegen.py"), "--arch", str(arch), "--shape", "8192", "8192",
        str(n_out), "--k", str(k), "--dtype", "bfloat16", "--only", "topk.", "--json", str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    recs = json.loads(out.read_text())
    if n_out <= MAX_RESIDENT:
        assert [r["name"] for r in recs] == ["topk.topk_kernel"]
        assert recs[0]["programs"] == 1
    else:
        assert [r["name"] for r in recs] == ["topk.radix_histogram_kernel"] * 4 + ["topk.radix_write_kernel"]
        assert all(r["programs"] == -(-n_out // 1024) for r in recs), recs
    for r in recs:
        assert r["error"] is None, r["error"]
        assert r["smem_fits"], r
        if r["spill_bytes"] is not None:
            assert r["inner_loop_spills"] == 0 and r["spill_bytes"] <= 32, r
