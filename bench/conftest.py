"""The benchmark suite (``pytest bench --benchmark-only``): shared pytest hooks.

``bench/workloads.py`` holds the shapes and the calls timed, ``bench/timing.py`` the
side-by-side timing, ``bench/hardware.py`` the device names, peak table and roofline
model, ``bench/report.py`` the Markdown table and PNG made from a ``--benchmark-json``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform

import numpy as np
import pytest
import torch

from meprop_triton.utils import keep_freed_memory

from .hardware import cpu_name
from .targets import ASSERT_OPTION, UNMET

try:
    _LOAD_AT_START = list(os.getloadavg())  # when pytest loaded the suite
except OSError:
    _LOAD_AT_START = None


_KEPT_FREED_MEMORY = None


def pytest_addoption(parser):
    parser.addoption(
        "--assert-targets",
        action="store_true",
        dest=ASSERT_OPTION,
        default=False,
        help="fail a benchmark case whose speed target is not met (by default a "
        "--benchmark-only run records each target and whether it was met in the case's "
        "extra_info, and fails only when a case breaks)",
    )


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """List the targets not met in this run (they fail it only under --assert-targets)."""
    if not UNMET:
        return
    how = "failed" if config.getoption(ASSERT_OPTION) else "recorded; --assert-targets makes them fail"
    terminalreporter.section(f"speed targets not met ({how})")
    for line in UNMET:
        terminalreporter.write_line(line)


def pytest_configure(config):
    """A timing run keeps freed memory in the process (``keep_freed_memory``), as a
    training loop should: otherwise glibc hands blocks of a few hundred KiB to a few MiB
    back to the system and every call faults their pages in again, a cost that varies
    from process to process and lands on small cases (tens of faults per 50 x 784->500
    backward on a 2-core VM). A ``--benchmark-disable`` run (the smoke test inside the
    test suite) leaves malloc alone."""
    global _KEPT_FREED_MEMORY
    if not config.getoption("benchmark_disable", False):
        _KEPT_FREED_MEMORY = keep_freed_memory()


def pytest_benchmark_update_machine_info(config, machine_info):
    """Add what a reader of the JSON needs to know about the machine and the software."""
    machine_info["meprop"] = _machine_info(config)


def _machine_info(config) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "torch": torch.__version__,
        "triton": triton_version,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_model": cpu_name(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "cuda": torch.version.cuda,
        "gpu": None,
        "malloc_keeps_freed_memory": _KEPT_FREED_MEMORY,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_bytes": props.total_memory,
            "count": torch.cuda.device_count(),
            "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        }
    info["command"] = " ".join(["python -m pytest", *config.invocation_params.args])
    info["loadavg_at_start"] = _LOAD_AT_START
    try:
        info["loadavg_at_end"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def recorded_commit(path: str | None = None) -> dict:
    """The commit a copy of the checkout without ``.git`` came from: ``bench/COMMIT``
    (``path``), its first line the commit, any further lines ``git status --porcelain``
    at the copy (bench/README.md: a GPU machine may get the working tree alone). {}
    without one."""
    try:
        with open(path or os.path.join(os.path.dirname(__file__), "COMMIT")) as f:
            lines = f.read().split("\n")
    except OSError:
        return {}
    if not lines[0].strip():
        return {}
    return {"id": lines[0].strip(), "dirty": any(line.strip() for line in lines[1:]), "source": "bench/COMMIT"}


def _git_commit() -> dict:
    import subprocess

    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=30,
                              check=True, cwd=os.path.dirname(__file__)).stdout.strip()

    try:
        return {"id": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {}


def pytest_benchmark_update_commit_info(config, commit_info):
    """pytest-benchmark reads the commit from git; a copy without ``.git`` has
    ``bench/COMMIT`` instead. Where both are there and differ, the file's is kept too
    (``commit_file``): the H200 machine's copy of ``.git`` named the commit the session
    began at, while the tree sent, and ``bench/COMMIT`` written with it, were newer."""
    recorded = recorded_commit()
    if commit_info.get("id") in (None, "", "unversioned"):  # pytest-benchmark's word for no git
        commit_info.update(recorded)
    elif recorded and recorded["id"] != commit_info.get("id"):
        commit_info["commit_file"] = recorded["id"]


#: Environment variable naming a JSON-lines file to which every finished benchmark case is
#: appended at once (bench/gpu_run.sh sets it): pytest-benchmark writes its JSON only when
#: the session ends, so a crash (a CUDA error, a kill) would lose the whole group.
PARTIAL_ENV = "MEPROP_BENCH_PARTIAL"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield
    path = os.environ.get(PARTIAL_ENV)
    fixture = getattr(item, "funcargs", {}).get("benchmark")
    stats = getattr(fixture, "stats", None)
    if not path or stats is None:
        return
    try:
        case = stats.as_dict(include_data=False)
        lines = []
        if not os.path.exists(path):  # the file's first line: what the JSON's top level holds
            commit = recorded_commit() or _git_commit()
            lines.append({
                "machine_info": {"meprop": _machine_info(item.config), "python_version": platform.python_version()},
                "commit_info": commit,
                "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            })
        lines.append({"benchmark": case})
        with open(path, "a") as f:
            f.writelines(json.dumps(line, default=str) + "\n" for line in lines)
    except Exception as e:  # noqa: BLE001 - a side record: never fail the case for it
        print(f"bench/conftest.py: could not append to {path}: {type(e).__name__}: {e}")
