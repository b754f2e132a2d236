"""What a meProp layer adds to the forward pass, which a training step pays every call.

``MePropLinear`` vs ``nn.Linear`` at 8 x 64 -> 64 with grad enabled (the parameters
require grad, so each call records an autograd node), the two timed interleaved in one
run. One timed call is ``N_CALLS`` forwards in a row (a single forward is ~10 us, too
short to time alone); ``overhead_us`` is the median over rounds of the per-forward
difference. Target (issue 12; recorded by ``bench/targets.py``, failing only under
``--assert-targets``): at most 15 us on a CPU. The shape is small on purpose: there the fixed costs are all there is.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from meprop_triton import MePropLinear

from .hardware import device_name
from .targets import Target, check_targets
from .timing import measure
from .workloads import needs_gpu

N_CALLS = 200
SHAPE = (8, 64, 64)
TARGETS = {"cpu": Target("overhead_us", most=15.0)}


def _forwards(layer, x):
    def call():
        y = None
        for _ in range(N_CALLS):
            y = layer(x)
        return y
    return call


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_gpu)])
def test_forward_overhead(benchmark, request, device):
    M, n_in, n_out = SHAPE
    torch.manual_seed(0)
    dense = nn.Linear(n_in, n_out, device=device)
    mp = MePropLinear(n_in, n_out, k=8, device=device)
    x = torch.randn(M, n_in, device=device)
    benchmark.group = f"forward-{device}-{M}x{n_in}-{n_out}"
    benchmark.extra_info.update(
        shape=[M, n_in, n_out], shape_name=f"{M} x {n_in}->{n_out}", k=8, k_frac=8 / n_out,
        backend="meprop", mode="forward", grad="-", dtype="float32",
        device=device_name(device), device_type=device, threads=torch.get_num_threads(),
        torch=torch.__version__, calls_per_round=N_CALLS, baseline="nn.Linear forward, grad enabled",
    )
    with torch.enable_grad():
        fns = {"dense": _forwards(dense, x), "meprop": _forwards(mp, x)}
        medians = measure(benchmark, fns, candidate="meprop", device=device, budget_s=1.5, min_rounds=20)
    if medians is None:
        return
    overhead_us = medians.paired_diff["dense"] / N_CALLS * 1e6
    benchmark.extra_info.update(
        dense_forward_us=round(medians["dense"] / N_CALLS * 1e6, 3),
        meprop_forward_us=round(medians["meprop"] / N_CALLS * 1e6, 3),
        overhead_us=round(overhead_us, 3),
        speedup_vs_dense=round(medians.paired["dense"], 3),
    )
    target = TARGETS.get(device)
    if target is not None:
        check_targets(
            benchmark, request.config, target, {"overhead_us": overhead_us},
            context=f"MePropLinear forward {medians['meprop'] / N_CALLS * 1e6:.1f} us vs "
            f"nn.Linear {medians['dense'] / N_CALLS * 1e6:.1f} us",
        )
