"""The test suite's own setup: how many workers ``pytest -n auto`` starts, and that the
suite still runs where pytest-xdist is not installed (a GPU machine's preinstalled pytest)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
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
        cwd=HERE.parent, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "test_auto_workers" in proc.stdout
