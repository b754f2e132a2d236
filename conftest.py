"""pytest's setup for the whole checkout (``tests/`` and ``bench/``), run before any of
their own conftest files."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent


def import_installed_kernels_package():
    """Put the installed distribution named ``kernels``, if there is one, in ``sys.modules``.

    The checkout's top-level ``kernels/`` folder is installed as ``meprop_triton.kernels``
    (pyproject.toml's package-dir), but wherever the checkout's root is on ``sys.path`` (``python -m
    pytest`` run there puts it first, and the tests that import ``bench`` add it) a plain
    ``import kernels`` finds that folder. transformers 5.25 installs the Hugging Face
    kernel hub's distribution named ``kernels`` and imports it when it is present: it got
    our folder and failed (``cannot import name 'CUDAProperties' from 'kernels'``). Here
    the real one is imported from ``sys.path`` without the checkout, before any test
    imports transformers. Returns the module, or None where there is none (or it fails to
    import: then transformers reports its own error)."""
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None

    def ours(module):
        return Path(getattr(module, "__file__", None) or "/").resolve().is_relative_to(CHECKOUT)

    loaded = sys.modules.get("kernels")
    if loaded is not None and not ours(loaded):
        return loaded
    for name in [n for n in sys.modules if n == "kernels" or n.startswith("kernels.")]:
        del sys.modules[name]
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if Path(p or os.getcwd()).resolve() != CHECKOUT]
    try:
        module = importlib.import_module("kernels")
    except Exception:  # noqa: BLE001 - a broken install is transformers' to report, with its own error
        return None
    finally:
        sys.path[:] = saved
    return None if ours(module) else module


import_installed_kernels_package()
