"""Triton kernels of meprop-triton, installed as ``meprop_triton.kernels``.

Each module holds ``@triton.jit`` kernels and their plain launchers only; the autograd
Functions that use them live in :mod:`meprop_triton.functional`. Nothing here is imported
when ``meprop_triton`` is imported, and nothing here touches CUDA at import time.
"""
