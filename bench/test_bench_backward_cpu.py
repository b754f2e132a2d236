"""One linear layer's backward on a CPU: meProp (torch path) vs dense ``nn.Linear``.

Run with ``pytest bench --benchmark-only``. Dense and meProp are timed side by side in
the same run; ``speedup_vs_dense`` in each meProp case's ``extra_info`` is the ratio of
their medians, measured interleaved.
"""

from __future__ import annotations

import platform

import pytest
import torch
from torch import nn

from meprop_triton import MePropLinear

from .conftest import paired_medians, rotating

# (name, M, in, out, k, speedup the case must reach with dense gradients)
CASES = [
    ("mnist-50x784x500", 50, 784, 500, 80, 2.0),
    ("large-256x4096x4096", 256, 4096, 4096, 0.05, 5.0),
]
N_SETS = 3  # input sets rotated through, so that no timing measures one warm cache


def _backward_calls(layer: nn.Linear, M: int, seed: int):
    """Closures that each run one backward of ``layer`` on a fresh-looking input set."""
    gen = torch.Generator().manual_seed(seed)
    calls = []
    params = (layer.weight, layer.bias)
    for _ in range(N_SETS):
        x = torch.randn(M, layer.in_features, generator=gen, requires_grad=True)
        y = layer(x)
        g = torch.randn(M, layer.out_features, generator=gen)
        calls.append(
            lambda y=y, x=x, g=g: torch.autograd.grad(y, (x, *params), g, retain_graph=True)
        )
    return calls


def _layers(M, d_in, d_out, k):
    torch.manual_seed(0)
    dense = nn.Linear(d_in, d_out)
    return dense, MePropLinear.from_linear(dense, k=k, backend="torch")


@pytest.mark.parametrize("name,M,d_in,d_out,k,target", CASES, ids=[c[0] for c in CASES])
def test_dense_backward(benchmark, name, M, d_in, d_out, k, target):
    dense, _ = _layers(M, d_in, d_out, k)
    benchmark.group = f"backward-cpu-{name}"
    benchmark.extra_info.update(
        backend="dense", mode="dense", shape=[M, d_in, d_out], k=d_out, dtype="float32",
        device=platform.processor() or "cpu", threads=torch.get_num_threads(),
    )
    benchmark(rotating(_backward_calls(dense, M, seed=1)))


@pytest.mark.parametrize("name,M,d_in,d_out,k,target", CASES, ids=[c[0] for c in CASES])
def test_meprop_backward(benchmark, request, name, M, d_in, d_out, k, target):
    dense, meprop = _layers(M, d_in, d_out, k)
    dense_fn = rotating(_backward_calls(dense, M, seed=1))
    meprop_fn = rotating(_backward_calls(meprop, M, seed=1))
    benchmark.group = f"backward-cpu-{name}"
    benchmark.extra_info.update(
        backend="torch", mode="unified-topk", shape=[M, d_in, d_out], k=meprop.k_units,
        dtype="float32", device=platform.processor() or "cpu", threads=torch.get_num_threads(),
        grad="dense",
    )
    benchmark(meprop_fn)
    if benchmark.disabled:
        return
    rounds = 40 if d_out * d_in * M < 1e8 else 15
    t_dense, t_meprop = paired_medians([dense_fn, meprop_fn], rounds=rounds)
    speedup = t_dense / t_meprop
    benchmark.extra_info.update(
        speedup_vs_dense=round(speedup, 3),
        dense_median_s=t_dense,
        meprop_median_s=t_meprop,
    )
    if not request.config.getoption("benchmark_only"):
        return  # speed is judged only in a dedicated `--benchmark-only` run
    assert speedup >= target, (
        f"meProp backward {t_meprop * 1e3:.3f} ms vs dense {t_dense * 1e3:.3f} ms: "
        f"{speedup:.2f}x, below the {target}x this shape must reach"
    )
