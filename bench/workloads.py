"""What the benchmarks run: shapes, k values, modes, and one layer's backward as a call.

Layers and input sets are built once per (device, dtype, shape) and shared by every case
of that shape (a meProp layer shares the dense layer's parameters through
``MePropLinear.from_linear``), so that the suite spends its time timing, not building.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from torch import nn

from meprop_triton import MePropLinear

N_SETS = 3  # input sets rotated through, so that no timing measures one warm cache

#: the k sweep of every backward case, as fractions of out_features
K_FRACTIONS = (0.01, 0.02, 0.05, 0.10, 0.25, 0.50)

#: (M tokens, in_features, out_features) per device
SHAPES = {
    "cpu": {"mnist": (50, 784, 500), "large": (256, 4096, 4096)},
    "cuda": {"mnist": (50, 784, 500), "large": (8192, 4096, 4096)},
}

#: the paper's GPU table (Sun et al. 2017, Table 7): batch 1024, 8192 -> 8192, k in units;
#: timed on a GPU only, Triton unified top-k vs dense, bf16 and fp32
PAPER_SHAPES = {"cuda": {"table7": (1024, 8192, 8192)}}
TABLE7_K = (8, 16, 32, 64, 128, 256, 512)
TABLE7_DTYPES = ("bf16", "fp32")
#: the paper's own figures for that table (GTX 1080, its code): backprop time in ms,
#: dense and meProp at the k values it states (36.8x at k=8)
PAPER_TABLE7 = {"dense_ms": 308.0, "meprop_ms": {8: 8.4, 512: 70.0}}


def shape_of(device: str, shape_key: str):
    """(M, in, out) of a shape key: the k-sweep shapes (``SHAPES``) or the paper's."""
    shape = SHAPES.get(device, {}).get(shape_key) or PAPER_SHAPES.get(device, {}).get(shape_key)
    if shape is None:
        raise KeyError(f"no shape {shape_key!r} for device {device!r}")
    return shape


#: mode name -> (unified, selection)
MODES = {
    "unified-topk": (True, "topk"),
    "per-example-topk": (False, "topk"),
    "unified-random": (True, "random"),
    "per-example-random": (False, "random"),
}

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

NO_GPU = not torch.cuda.is_available()
GPU_REASON = (
    "needs a CUDA GPU: the Triton kernels and cuBLAS baselines are timed on a GPU only "
    "(Triton's CPU interpreter is never benchmarked)"
)
needs_gpu = pytest.mark.skipif(NO_GPU, reason=GPU_REASON)


def rotating(calls):
    """A function that runs the given calls in turn, one per invocation, so that
    consecutive timings do not reuse one input set's warm cache."""
    cycle = itertools.cycle(calls)
    return lambda: next(cycle)()


def shape_name(shape) -> str:
    M, d_in, d_out = shape
    return f"{M}x{d_in}->{d_out}"


def k_id(k) -> str:
    return f"k{round(k * 100)}pct" if isinstance(k, float) else f"k{k}"


@functools.lru_cache(maxsize=4)
def dense_layer(device: str, dtype: torch.dtype, shape) -> nn.Linear:
    """The layer of a shape (seed 0), shared by every case of that shape."""
    _, d_in, d_out = shape
    torch.manual_seed(0)
    return nn.Linear(d_in, d_out).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=4)
def input_sets(device: str, dtype: torch.dtype, shape):
    """``N_SETS`` pairs ``(x, grad_output)`` of a shape (seed 1), fresh random values."""
    M, d_in, d_out = shape
    gen = torch.Generator().manual_seed(1)
    sets = []
    for _ in range(N_SETS):
        x = torch.randn(M, d_in, generator=gen).to(device=device, dtype=dtype)
        g = torch.randn(M, d_out, generator=gen).to(device=device, dtype=dtype)
        sets.append((x.requires_grad_(), g))
    return tuple(sets)


def layer_for(device, dtype, shape, *, backend=None, k=None, mode="unified-topk", sparse_grad=False):
    """The dense layer (``backend=None``) or a meProp view of it sharing its parameters."""
    dense = dense_layer(str(device), dtype, shape)
    if backend is None:
        return dense
    unified, selection = MODES[mode]
    return MePropLinear.from_linear(
        dense, k=k, unified=unified, selection=selection, sparse_grad=sparse_grad, backend=backend
    )


def backward_call(layer: nn.Linear, device, dtype, shape):
    """A function that runs one backward of ``layer`` (grad of x, W and b), rotating input sets.

    The forward graphs are built by ``fn.prepare()`` (``timing.measure`` calls it before
    timing; a smoke run under ``--benchmark-disable`` builds only the one it uses), and
    every call differentiates one of them again (``retain_graph``), so only the backward
    is timed.
    """
    params = (layer.weight, layer.bias)
    sets = input_sets(str(device), dtype, shape)
    graphs = [None] * len(sets)

    def build(i):
        if graphs[i] is None:
            graphs[i] = layer(sets[i][0])
        return graphs[i]

    def call(i):
        x, g = sets[i]
        return torch.autograd.grad(build(i), (x, *params), g, retain_graph=True)

    fn = rotating([functools.partial(call, i) for i in range(len(sets))])
    fn.prepare = lambda: [build(i) for i in range(len(sets))]
    return fn
