"""``kernels._launch.FastLaunch``: after its first launch, a compiled kernel's launch skips
Triton's argument binding and cache key, and must hand Triton's launcher exactly what
Triton's own path would. ``fast_launch_check.py`` runs in a subprocess without
``TRITON_INTERPRET`` under ``bench/stand_in_driver.py`` (Triton's launch path for real, up
to a launcher that records), and compares the two launch for launch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

import kernel_checks  # noqa: E402

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    out = tmp_path_factory.mktemp("fast_launch") / "summary.json"
    proc = subprocess.run(
        [sys.executable, str(HERE / "fast_launch_check.py"), str(out)],
        cwd=kernel_checks.ROOT, env=kernel_checks.compiled_env(), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return json.loads(out.read_text())


def test_every_specialisation_class_launches_what_triton_launches(summary):
    got = summary["classes"]
    assert got["calls"] == 540
    # Triton compiled many specialisations (integer classes, alignment, dtype, constexpr),
    # and the fast path kept at least one key for each
    assert got["binaries"] >= 20
    assert got["fast_path_keys"] >= got["binaries"]


def test_a_backward_launches_the_same_kernels_and_skips_triton_once_cached(summary):
    got = summary["backward"]
    assert got["launches"] >= 30
    for name in ("partial_kernel", "topk_kernel", "radix_histogram_kernel", "gather_columns_kernel",
                 "grad_input_kernel", "grad_weight_kernel", "row_select_kernel"):
        assert name in got["kernels"]


def test_a_callable_grid_or_a_pre_run_hook_goes_through_triton_every_time(summary):
    assert summary["fallbacks"]["triton_runs"] == 7


def test_what_it_cannot_key_goes_through_triton(summary):
    got = summary["refusals"]
    assert got["intenum_runs"] == 8
    assert got["amd_usable"] is False
    assert got["traced"] == {"False": True, "True": True}


def test_fast_launch_is_what_launchable_gives_a_compiled_kernel():
    from meprop_triton.kernels import _launch
    from meprop_triton.kernels import scores

    if _launch.is_interpreted(scores.partial_kernel):
        # interpreted kernels launch as they are (no compiled kernel to keep)
        assert _launch.launchable(scores.partial_kernel, False) is scores.partial_kernel
        return
    assert isinstance(_launch.launchable(scores.partial_kernel, False), _launch.FastLaunch)


@pytest.mark.parametrize("value,expected", [("0", False), ("off", False), ("1", True), ("", True)])
def test_the_environment_can_turn_it_off(value, expected):
    env = kernel_checks.compiled_env()
    env["MEPROP_TRITON_FAST_LAUNCH"] = value
    code = "from meprop_triton.kernels import _launch; print(_launch.FAST_LAUNCH)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=kernel_checks.ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(expected)
