"""``bench/host_glue.py``: the host time of one eager unified Triton backward with the
launches dropped. Run in a subprocess without ``TRITON_INTERPRET`` (the ops must be the
compiled-kernel ones, whose launches the tool stubs out). Times are reported, never
asserted; what is checked is that the tool runs the public op function through the
launches a GPU backward makes, and that its errors are clear."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

import kernel_checks  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _run(*args, tmp_path=None):
    env = kernel_checks.compiled_env()
    cmd = [sys.executable, str(ROOT / "bench" / "host_glue.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "shape,k,launches",
    [
        # 8192 x 4096 -> 4096: the scores in row slices, finished in the top-k program;
        # grad_W split-K
        (("8192", "4096", "4096"), 205, ["scores.partial_kernel", "topk.topk_kernel",
                                         "matmul.gather_columns_kernel", "matmul.grad_input_kernel",
                                         "matmul.grad_weight_kernel", "matmul.split_reduce_kernel"]),
        # out > 4096: the finish kernel, then one resident top-k program
        (("1024", "256", "8192"), 410, ["scores.partial_kernel", "scores.finish_kernel", "topk.topk_kernel",
                                        "matmul.gather_columns_kernel", "matmul.grad_input_kernel",
                                        "matmul.grad_weight_kernel", "matmul.split_reduce_kernel"]),
        # out > 16384: the multi-program top-k (four histogram rounds and the write pass)
        (("1024", "256", "16400"), 820, ["scores.partial_kernel", "scores.finish_kernel"]
         + ["topk.radix_histogram_kernel"] * 4 + ["topk.radix_write_kernel", "matmul.gather_columns_kernel",
                                                  "matmul.grad_input_kernel", "matmul.grad_weight_kernel",
                                                  "matmul.split_reduce_kernel"]),
    ],
    ids=["target", "wide", "wider"],
)
def test_reports_the_glue_of_the_launches_a_gpu_backward_makes(shape, k, launches, tmp_path):
    out = tmp_path / "glue.json"
    proc = _run("--shape", *shape, "--k", str(k), "--calls", "5", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["launch_names"] == launches
    assert rec["launches"] == len(launches)
    assert 0 < rec["us_min"] <= rec["us_per_call"]
    assert f"{len(launches)} launches" in proc.stdout


def test_rejects_a_bad_k():
    proc = _run("--shape", "64", "32", "100", "--k", "101", "--calls", "1")
    assert proc.returncode == 2
    assert "k must lie in [1, OUT=100]; got 101" in proc.stderr


@pytest.mark.parametrize("launch", ["triton", "fast"])
def test_times_the_launches_through_triton_or_the_fast_path(launch, tmp_path):
    """With ``--launch triton`` / ``fast`` each launch goes through Triton's launch path
    (under the stand-in driver) or the package's FastLaunch: the same launches, and the
    mode recorded."""
    out = tmp_path / "glue.json"
    proc = _run("--shape", "256", "64", "300", "--k", "13", "--calls", "3", "--launch", launch,
                "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["launch"] == launch
    assert rec["launch_names"] == ["scores.partial_kernel", "topk.topk_kernel", "matmul.gather_columns_kernel",
                                   "matmul.grad_input_kernel", "matmul.grad_weight_kernel"]
    assert 0 < rec["us_min"] <= rec["us_per_call"]
    assert "launches through" in proc.stdout
