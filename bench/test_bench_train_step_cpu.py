"""One training step (forward + backward + optimizer) of an MLP on a CPU.

MLP 784 -> 4096 -> 4096 -> 10, batch 64: meProp k = 5% on the hidden layers with
row-sparse gradients and SparseAdam (the classifier dense, with Adam) vs the dense
model with Adam, timed side by side (interleaved) in one run.
"""

from __future__ import annotations

import platform

import pytest
import torch
from torch import nn

from meprop_triton import convert

from .conftest import paired_medians, rotating

BATCH, DIMS, K = 64, (784, 4096, 4096, 10), 0.05
TARGET = 3.0  # the speedup the sparse-gradient step must reach


def mlp(seed=0):
    torch.manual_seed(seed)
    d0, d1, d2, d3 = DIMS
    return nn.Sequential(
        nn.Linear(d0, d1), nn.ReLU(), nn.Linear(d1, d2), nn.ReLU(), nn.Linear(d2, d3)
    )


def dense_setup():
    model = mlp()
    return model, [torch.optim.Adam(model.parameters(), lr=1e-3)]


def meprop_setup(sparse_grad=True):
    model = convert(mlp(), k=K, sparse_grad=sparse_grad, exclude=["4"])
    hidden = [p for name, p in model.named_parameters() if not name.startswith("4.")]
    if sparse_grad:
        opts = [torch.optim.SparseAdam(hidden, lr=1e-3)]
    else:
        opts = [torch.optim.Adam(hidden, lr=1e-3)]
    return model, opts + [torch.optim.Adam(model[4].parameters(), lr=1e-3)]


def step_calls(model, opts, seed=1, n_sets=3):
    gen = torch.Generator().manual_seed(seed)
    calls = []
    for _ in range(n_sets):
        x = torch.randn(BATCH, DIMS[0], generator=gen)
        y = torch.randint(0, DIMS[-1], (BATCH,), generator=gen)

        def step(x=x, y=y):
            for o in opts:
                o.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            for o in opts:
                o.step()

        calls.append(step)
    return calls


def info(benchmark, mode, grad):
    benchmark.group = "train-step-cpu-mlp-784-4096-4096-10"
    benchmark.extra_info.update(
        backend="dense" if mode == "dense" else "torch", mode=mode, grad=grad,
        shape=[BATCH, *DIMS], k=K, dtype="float32", device=platform.processor() or "cpu",
        threads=torch.get_num_threads(),
    )


def test_train_step_dense(benchmark):
    info(benchmark, "dense", "dense")
    benchmark.pedantic(rotating(step_calls(*dense_setup())), rounds=12, warmup_rounds=2)


@pytest.mark.parametrize("sparse_grad", [True, False], ids=["sparse-grad", "dense-grad"])
def test_train_step_meprop(benchmark, request, sparse_grad):
    info(benchmark, "unified-topk", "sparse" if sparse_grad else "dense")
    meprop_fn = rotating(step_calls(*meprop_setup(sparse_grad)))
    benchmark.pedantic(meprop_fn, rounds=12, warmup_rounds=2)
    if benchmark.disabled:
        return
    dense_fn = rotating(step_calls(*dense_setup()))
    t_dense, t_meprop = paired_medians([dense_fn, meprop_fn], rounds=12)
    speedup = t_dense / t_meprop
    benchmark.extra_info.update(
        speedup_vs_dense=round(speedup, 3), dense_median_s=t_dense, meprop_median_s=t_meprop
    )
    if sparse_grad and request.config.getoption("benchmark_only"):
        assert speedup >= TARGET, (
            f"meProp step {t_meprop * 1e3:.1f} ms vs dense {t_dense * 1e3:.1f} ms: "
            f"{speedup:.2f}x, below {TARGET}x"
        )
