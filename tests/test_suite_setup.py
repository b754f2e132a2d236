"""The test suite's own setup: how many workers ``pytest -n auto`` starts, that the suite
still runs where pytest-xdist is not installed (a GPU machine's preinstalled pytest), and
CI's work folders (.ci/work_dirs.sh): a killed run's folder is removed by the next run."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _conftest():
    spec = importlib.util.spec_from_file_location("_meprop_tests_conftest", HERE / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    "cpus,cuda,workers",
    [(1, False, 1), (2, False, 2), (8, False, 8), (64, False, 8), (2, True, 2), (64, True, 4), (0, False, 1)],
)
def test_auto_workers(cpus, cuda, workers):
    assert _conftest().auto_workers(cpus, cuda) == workers


def test_auto_worker_hook_reads_the_cpu_affinity_and_the_gpu(monkeypatch):
    mod = _conftest()
    monkeypatch.setattr(mod.os, "sched_getaffinity", lambda pid: set(range(3)), raising=False)
    monkeypatch.setattr(mod.torch.cuda, "is_available", lambda: False)
    assert mod.pytest_xdist_auto_num_workers(None) == 3
    monkeypatch.setattr(mod.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mod.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert mod.pytest_xdist_auto_num_workers(None) == 4


def test_collects_without_xdist():
    """The hook above is optional: with pytest-xdist absent (``-p no:xdist``), collecting
    the suite is not an error."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "--collect-only", "-q",
         str(HERE / "test_suite_setup.py")],
        cwd=HERE.parent, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "test_auto_workers" in proc.stdout


WORK_DIRS = HERE.parent / ".ci" / "work_dirs.sh"
needs_proc = pytest.mark.skipif(
    not Path("/proc/self/stat").exists() or shutil.which("bash") is None, reason="needs Linux's /proc and bash"
)


def _ci_shell(script: str) -> str:
    proc = subprocess.run(
        ["bash", "-c", f'set -euo pipefail; . "{WORK_DIRS}"; {script}'],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@needs_proc
def test_ci_removes_the_work_folders_of_killed_runs_only(tmp_path):
    root = tmp_path
    finished = subprocess.Popen(["sleep", "0"])
    finished_start = _ci_shell(f"ci_proc_start {finished.pid}").strip()
    finished.wait()
    live = subprocess.Popen(["sleep", "120"])
    try:
        live_start = _ci_shell(f"ci_proc_start {live.pid}").strip()
        assert live_start.isdigit() and finished_start.isdigit()
        owners = {
            "meprop-ci.killed": f"{finished.pid} {finished_start}",  # its process is gone
            "meprop-ci.running": f"{live.pid} {live_start}",
            "meprop-ci.reused": f"{live.pid} {int(live_start) + 1}",  # its pid now names another process
            "meprop-ci.empty": "",
        }
        for name, owner in owners.items():
            (root / name).mkdir()
            (root / name / "owner").write_text(owner + "\n")
            (root / name / "venv").mkdir()
        for name in ("meprop-ci.older-fresh", "meprop-ci.older-stale", "unrelated"):
            (root / name).mkdir()
        hours_ago = time.time() - 4 * 3600
        os.utime(root / "meprop-ci.older-stale", (hours_ago, hours_ago))
        os.utime(root / "unrelated", (hours_ago, hours_ago))

        out = _ci_shell(f'ci_remove_stale_work_dirs "{root}"; ci_new_work_dir "{root}"')
        new = Path(out.strip().splitlines()[-1])
        assert new.parent == root and new.name.startswith("meprop-ci.")
        left = {p.name for p in root.iterdir()}
        assert left == {"meprop-ci.running", "meprop-ci.older-fresh", "unrelated", new.name}, out
        for gone in ("killed", "reused", "empty", "older-stale"):
            assert f"removing {root}/meprop-ci.{gone} " in out
        pid, start = (new / "owner").read_text().split()
        assert int(pid) > 0 and start.isdigit()

        # the shell that made the new folder has exited: the next run removes it, and
        # still keeps the running one's
        _ci_shell(f'ci_remove_stale_work_dirs "{root}"')
        assert {p.name for p in root.iterdir()} == {"meprop-ci.running", "meprop-ci.older-fresh", "unrelated"}
    finally:
        live.kill()
        live.wait()


def test_a_distribution_named_kernels_is_not_shadowed_by_the_checkouts_folder(tmp_path):
    """With the checkout's root first on sys.path (``python -m pytest`` there), ``import
    kernels`` finds the checkout's kernels/ folder; the root conftest's helper (which runs
    for tests/ and bench/ alike) puts an installed
    distribution named ``kernels`` (transformers 5.25 installs one) in sys.modules instead."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("CUDAProperties = 'the installed kernels'\n")
    info = site / "kernels-0.19.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.19.1\n")
    script = (
        "import importlib.util, sys\n"
        "spec = importlib.util.find_spec('kernels')\n"
        f"assert spec.origin == {str(HERE.parent / 'kernels' / '__init__.py')!r}, spec.origin  # the hazard\n"
        f"spec = importlib.util.spec_from_file_location('_conftest', {str(HERE.parent / 'conftest.py')!r})\n"
        "conftest = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(conftest)\n"
        "import kernels\n"
        "from kernels import CUDAProperties\n"
        "assert CUDAProperties == 'the installed kernels', kernels.__file__\n"
        "assert importlib.util.find_spec('kernels').origin == kernels.__file__\n"
        "print('ok', kernels.__file__)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(site))
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.startswith("ok " + str(site))
