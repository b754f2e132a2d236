"""The benchmark suite (``pytest bench --benchmark-only``): shared pytest hooks.

``bench/workloads.py`` holds the shapes and the calls timed, ``bench/timing.py`` the
side-by-side timing, ``bench/hardware.py`` the device names, peak table and roofline
model, ``bench/report.py`` the Markdown table and PNG made from a ``--benchmark-json``.
"""

from __future__ import annotations

import os
import platform

import numpy as np
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
    machine_info["meprop"] = info
