"""``bench/kernel_sweep.py``: every kernel of the unified backward timed alone and each
GEMM under every config its autotuner may try, each config's numbers checked first. On a
CPU its ``--dry-run`` runs the same steps under Triton's interpreter at a tiny shape, in a
subprocess (the interpreter must be chosen before triton is imported). Times are never
asserted; what is checked is that each config's output is checked, and that a wrong one
fails the run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

import kernel_checks  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

#: sweep() in an interpreter child; with argv[1] == "wrong", grad_x's kernel call is
#: followed by a change of one output element; with "fail", grad_W raises at split 2;
#: with "interrupt", the command line is stopped in grad_W as a time cap stops it
CHILD = """
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
os.environ["MEPROP_TRITON_TEST_CONFIG"] = "1"
sys.path.insert(0, sys.argv[2])
import torch
from bench import kernel_sweep
from meprop_triton.kernels import matmul as mm
if sys.argv[1] == "wrong":
    real = mm.gathered_grad_input
    def wrong(*args, **kwargs):
        out = real(*args, **kwargs)
        out[0, 0] += 1.0
        return out
    mm.gathered_grad_input = wrong
if sys.argv[1] == "fail":
    real_w = mm.scattered_grad_weight
    def failing(*args, split=None, **kwargs):
        if split == 2:
            raise RuntimeError("out of resource: shared memory, Required: 300000")
        return real_w(*args, split=split, **kwargs)
    mm.scattered_grad_weight = failing
if sys.argv[1] == "interrupt":  # a time cap's SIGINT in the middle of grad_W
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    mm.scattered_grad_weight = interrupted
    sys.exit(kernel_sweep.main(["--dry-run", "--shape", "40", "48", "70", "--k", "9", "--json", sys.argv[3]]))
print(json.dumps(kernel_sweep.sweep(40, 48, 70, 9, torch.float32, dry=True)))
"""


def _child(mode):
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(ROOT)], cwd=ROOT,
                          env=kernel_checks.compiled_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_dry_run_checks_every_config_and_writes_json(tmp_path):
    out = tmp_path / "sweep.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kernel_sweep.py"), "--dry-run", "--json", str(out)],
        cwd=ROOT, env=kernel_checks.compiled_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads(out.read_text())
    assert saved["stopped"] is None
    rows = saved["rows"]
    kernels = [r["kernel"] for r in rows]
    assert kernels[0] == "selection (scores + top-k)" and "compaction G[:, S]" in kernels
    assert "compaction G[:, S] and W[S]" in kernels
    # the selection's two kernels under each candidate, the shipped one marked, all checked
    for name in ("column scores, first pass", "top-k program (from parts)"):
        cands = [r for r in rows if r["kernel"] == name]
        assert len(cands) >= 2 and all(r["ok"] is True for r in cands), cands
        assert sum("(shipped)" in r["config"] for r in cands) == 1
    # the same selection from finished scores under every config that holds them, the
    # rule's marked: the resident counting search beside the radix select's two forms
    finished = [r for r in rows if r["kernel"] == "top-k of finished scores"]
    assert all(r["ok"] is True for r in finished), finished
    kinds = {r["config"].split(" B")[0] for r in finished}
    assert kinds == {"counting, resident", "radix, one program", "radix, multi-program"}, kinds
    assert sum("(rule)" in r["config"] for r in finished) == 1
    gemms = [r for r in rows if r["kernel"].startswith(("grad_x", "grad_W"))]
    assert {r["kernel"] for r in gemms} == {
        "grad_x GEMM", "grad_W GEMM + zero rows", "grad_x, cuBLAS route", "grad_W, cuBLAS route"
    }
    assert all(r["ok"] is True and r["max_err"] <= r["tol"] for r in gemms)
    # the whole backward under both routes of triton_ops.UNIFIED_GEMMS
    assert {"whole backward (Triton GEMMs, autotuned)", "whole backward (cuBLAS GEMMs)"} <= set(kernels)
    # grad_W under each kept config and more than one split, the default marked
    splits = {r["config"].split(" split ")[1] for r in gemms if r["kernel"] == "grad_W GEMM + zero rows"}
    assert len(splits) >= 2 and any("(default)" in s for s in splits)
    # per-example: the row selection under each config that holds the row and the
    # streaming one, the shipped one marked, each checked exactly; the masked route's
    # launch; the whole per-example backward
    pe_rows = [r for r in rows if r["kernel"] == "per-example row top-k"]
    assert len(pe_rows) >= 3 and all(r["ok"] is True for r in pe_rows), pe_rows
    assert sum("(shipped)" in r["config"] for r in pe_rows) == 1
    assert any(r["config"].startswith("streaming") for r in pe_rows)
    assert any("masked copy" in r["config"] for r in pe_rows)
    assert any(k.startswith("whole per-example backward (") for k in kernels)
    for name in ("grad_x", "grad_W", "column scores", "top-k", "per-example row top-k"):
        assert f"fastest {name}:" in proc.stdout


def test_a_config_with_wrong_numbers_is_flagged():
    right = [r for r in _child("right") if r["kernel"] == "grad_x GEMM"]
    wrong = [r for r in _child("wrong") if r["kernel"] == "grad_x GEMM"]
    assert right and all(r["ok"] for r in right)
    assert wrong and not any(r["ok"] for r in wrong)
    assert all(r["max_err"] >= 0.5 for r in wrong)


def test_a_config_that_fails_to_run_is_a_row_not_the_end():
    rows = _child("fail")
    failed = [r for r in rows if r.get("error")]
    assert failed and all(" split 2" in r["config"] and "out of resource" in r["error"] for r in failed)
    assert all(r["us"] is None and "ok" not in r for r in failed)
    # the sweep went on: grad_W at split 1 and everything after it
    assert any(r["kernel"].startswith("grad_W") and r.get("ok") for r in rows)
    assert rows[-1]["kernel"] == "dense grad_W (cuBLAS)"


def test_a_sweep_stopped_by_its_time_cap_keeps_its_rows(tmp_path):
    out = tmp_path / "cut.json"
    proc = subprocess.run([sys.executable, "-c", CHILD, "interrupt", str(ROOT), str(out)], cwd=ROOT,
                          env=kernel_checks.compiled_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "stopped by an interrupt" in proc.stderr
    saved = json.loads(out.read_text())
    assert saved["stopped"].startswith("stopped by an interrupt")
    kernels = [r["kernel"] for r in saved["rows"]]
    assert "grad_x GEMM" in kernels and not any(k.startswith("grad_W") for k in kernels)
    # each row was printed as it was measured, before the stop
    assert proc.stdout.count("grad_x GEMM") >= 2 * kernels.count("grad_x GEMM")


def test_without_a_gpu_the_real_run_refuses_clearly():
    if kernel_checks.CUDA:
        pytest.skip("a GPU is here: the real run would time it")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_sweep.py")], cwd=ROOT,
                          env=kernel_checks.compiled_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr
