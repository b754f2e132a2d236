"""The selection step alone (column scores + top-k) vs ``torch.topk``, and its share of
the meProp backward it belongs to.

The candidate is the backend's own selection: on the torch path
``reference.select_topk(reference.column_scores(G), k)`` (fp32 scores, NaN as +inf, ties
to the lower index); on the Triton path ``triton_ops.select_units``, as the backward runs
it: the fused scores + bias-gradient pass over G in row slices, and the radix top-k
kernel (which adds up the slices itself up to 4,096 units). The baseline is the naive ``torch.topk(G.abs().sum(0), k)`` (no tie
or NaN rules). The meProp backward of the same backend (unified top-k, dense gradients)
runs interleaved with both, so ``share_of_backward`` compares numbers from one run.

Target (issue 3; recorded by ``bench/targets.py``, failing only under
``--assert-targets``): on the Triton path at bf16, 8192 x 4096->4096, k=5%, selection
<= 10% of the meProp backward.
"""

from __future__ import annotations

import pytest
import torch

from meprop_triton import reference
from meprop_triton._validation import resolve_k

from .hardware import DTYPE_NAMES, device_name, roofline
from .targets import Target, check_targets
from .timing import measure, peak_memory
from .workloads import (
    DTYPES,
    K_FRACTIONS,
    SHAPES,
    backward_call,
    input_sets,
    k_id,
    layer_for,
    needs_gpu,
    rotating,
    shape_name,
)

#: Issue 13: the selection (scores + top-k) within 1.5x of the bandwidth bound of reading G
#: once (``roofline_share`` = bound / time >= 1 / 1.5). It reads all of G, so it cannot
#: also be a small share of a backward that reads only G[:, S] besides.
TARGETS = {("cuda", "large", "bf16", "triton", 0.05): Target("roofline_share", least=round(1 / 1.5, 3))}
BUDGET_S = {("cpu", "mnist"): 0.3, ("cpu", "large"): 0.6, ("cuda", "mnist"): 0.1, ("cuda", "large"): 0.2}


def _cases():
    for shape_key in SHAPES["cpu"]:
        for k in K_FRACTIONS:
            yield pytest.param("cpu", shape_key, "fp32", "torch", k, id=f"cpu-fp32-{shape_key}-torch-{k_id(k)}")
    for shape_key in SHAPES["cuda"]:
        for backend in ("triton", "torch"):
            for k in K_FRACTIONS:
                yield pytest.param(
                    "cuda", shape_key, "bf16", backend, k,
                    id=f"cuda-bf16-{shape_key}-{backend}-{k_id(k)}", marks=[needs_gpu],
                )


def _selection(backend: str, grad: torch.Tensor, k: int):
    if backend == "triton":
        from meprop_triton.triton_ops import select_units

        # what the backward runs: the scores' pass, then the top-k (which finishes the
        # scores' row slices itself up to 4,096 units), the bias gradient beside
        return lambda: select_units(grad, k, traceable=False)
    return lambda: reference.select_topk(reference.column_scores(grad), k)


def _torch_topk(grad: torch.Tensor, k: int):
    return lambda: torch.topk(grad.abs().sum(0, dtype=torch.float32), k).indices


@pytest.mark.parametrize("device,shape_key,dt,backend,k", list(_cases()))
def test_selection(benchmark, request, device, shape_key, dt, backend, k):
    dtype, shape = DTYPES[dt], SHAPES[device][shape_key]
    M, d_in, d_out = shape
    k_units = resolve_k(k, d_out)
    grads = [g for _, g in input_sets(device, dtype, shape)]
    benchmark.group = f"selection-{device}-{dt}-{shape_key}-{shape_name(shape)}"
    benchmark.extra_info.update(
        backend=backend, mode="selection (scores + top-k)", grad="-", shape=list(shape),
        shape_name=shape_key, k=k_units, k_frac=round(k_units / d_out, 4), k_requested=k,
        dtype=DTYPE_NAMES[dtype], device=device_name(device), device_type=device,
        threads=torch.get_num_threads(),
        baseline="torch.topk(G.abs().sum(0), k)",
        speedup_vs_dense=None,
        speedup_vs_dense_note="selection is one step of a backward, not a backward; "
        "compared with torch.topk (speedup_vs_topk) and with its own meProp backward "
        "(share_of_backward)",
    )
    meprop = layer_for(device, dtype, shape, backend=backend, k=k)
    fns = {
        "backward": backward_call(meprop, device, dtype, shape),
        "topk": rotating([_torch_topk(g, k_units) for g in grads]),
        "selection": rotating([_selection(backend, g, k_units) for g in grads]),
    }
    medians = measure(
        benchmark, fns, candidate="selection", device=device, budget_s=BUDGET_S[device, shape_key]
    )
    if medians is None:
        return
    t = medians["selection"]
    share = t / medians["backward"]
    benchmark.extra_info.update(
        speedup_vs_topk=round(medians.paired["topk"], 3),
        share_of_backward=round(share, 4),
        **peak_memory(fns["selection"], device),
    )
    # Selection moves G once (plus the scores and the bias gradient); it does no GEMM.
    nbytes = M * d_out * dtype.itemsize + d_out * (4 + dtype.itemsize) + k_units * 8
    rl = roofline(device, dtype, 0, nbytes, t)
    benchmark.extra_info.update(rl)

    target = TARGETS.get((device, shape_key, dt, backend, k))
    if target is not None:
        check_targets(
            benchmark, request.config, target, {"roofline_share": rl["roofline_share"]},
            context=f"selection {t * 1e6:.1f} us, meProp backward {medians['backward'] * 1e6:.1f} us",
        )
