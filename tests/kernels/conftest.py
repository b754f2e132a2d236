"""Fixtures for the Triton kernel tests.

Mode, decided once when this file is imported (before any kernel module is):

* a CUDA GPU is present: the kernels are compiled and run on CUDA tensors;
* otherwise: the kernel modules are imported with ``TRITON_INTERPRET=1`` (``@triton.jit``
  then returns interpreter functions, a choice fixed at decoration time) and run on CPU
  tensors. The variable is restored right after the import, so tests outside this folder
  see the environment they were started with; an autouse fixture sets it again around
  each test here (the launchers check it at call time).

``TRITON_INTERPRET`` set by the caller is respected either way. Each kernel runs with its
one test config (``MEPROP_TRITON_TEST_CONFIG=1``), never the autotuner.

The AOT tests (``-m aot``) compile in a subprocess without ``TRITON_INTERPRET``, so they
work in the same pytest run as the interpreter tests.
"""

from __future__ import annotations

import pytest
import torch

import kernel_checks  # chooses the Triton mode and imports the kernel modules


def pytest_collection_modifyitems(config, items):
    if kernel_checks.MODE_ERROR is None:
        return
    skip = pytest.mark.skip(reason=kernel_checks.MODE_ERROR)
    for item in items:
        if item.get_closest_marker("interpreter") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _kernel_env(monkeypatch):
    """Interpreter mode (when chosen) and the single test config, for each kernel test."""
    if kernel_checks.INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("MEPROP_TRITON_TEST_CONFIG", "1")
    yield


@pytest.fixture
def device() -> str:
    return kernel_checks.DEVICE


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(31337)




@pytest.fixture(params=["cublas", "triton"])
def gemm_route(request, monkeypatch):
    """Each unified route of ``triton_ops.UNIFIED_GEMMS`` in turn: torch.mm on the
    compacted operands (cuBLAS on a GPU) and the Triton GEMMs."""
    from meprop_triton import triton_ops

    monkeypatch.setattr(triton_ops, "UNIFIED_GEMMS", request.param)
    return request.param
