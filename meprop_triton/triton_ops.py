"""The Triton unified top-k meProp backward as one ``torch.library`` custom op.

``torch.ops.meprop_triton.unified_topk_backward`` is a ``torch.library.triton_op``: its
kernel launches go through ``wrap_triton``, so ``torch.compile`` traces through it and
keeps one graph on a GPU, while eager calls launch the kernels directly. Under Triton's
interpreter (CPU tensors) it is an opaque custom op with a fake implementation instead,
since interpreted kernels cannot be traced.

Importing this module imports triton and the kernel modules (and registers the op); it
touches no CUDA. ``meprop_triton`` never imports it at package import: callers import it
lazily, when the Triton backend is used.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import triton_op

from .kernels import scores as _scores
from .kernels.matmul import gather_columns, gathered_grad_input, scattered_grad_weight
from .kernels.scores import column_scores_and_bias
from .kernels.topk import topk_indices

__all__ = ["unified_topk_backward"]

OP_NAME = "meprop_triton::unified_topk_backward"

#: Read ``G[:, S]`` once into a dense ``(M, k)`` tensor (one gather kernel) that both GEMMs
#: then read densely (True), or gather G's selected columns inside each GEMM's loads
#: (False: no temporary). Not yet measured on a GPU; the estimate behind the default:
#: with a row-major G each gathered element costs its own 32-byte sector, and the
#: in-GEMM gather re-reads the sectors once per output column tile (in / BLOCK_N times
#: per GEMM). At M = 8192, in = out = 4096, k = 5 %, bf16, BLOCK_N = 128 that is ~1.7 GB
#: of L2 sector traffic per GEMM, against ~40 MB of DRAM reads plus a 3.4 MB write for
#: the compaction. Flip it to compare (bench/).
COMPACT_GRAD = True


def _unified_topk_backward(
    grad: Tensor, x: Tensor, weight: Tensor, k: int, need_x: bool, need_w: bool, need_b: bool
) -> tuple[Tensor, Tensor, Tensor]:
    # Outputs that were not asked for come back as empty tensors (a custom op cannot
    # return None); unified_topk_backward turns them into None.
    if need_x or need_w:
        scores, grad_b = column_scores_and_bias(grad, traceable=True)
        idx, rest = topk_indices(scores, k, return_rest=True, traceable=True)
        g_sel = gather_columns(grad, idx, traceable=True) if COMPACT_GRAD else None
        grad_x = (
            gathered_grad_input(grad, weight, idx, grad_selected=g_sel, traceable=True)
            if need_x
            else grad.new_empty(0)
        )
        grad_w = (
            scattered_grad_weight(grad, x, idx, rest, grad_selected=g_sel, traceable=True)
            if need_w
            else grad.new_empty(0)
        )
    else:
        grad_x, grad_w = grad.new_empty(0), grad.new_empty(0)  # outputs may not alias
        grad_b = column_scores_and_bias(grad, traceable=True)[1] if need_b else grad.new_empty(0)
    if not need_b:
        grad_b = grad.new_empty(0)
    return grad_x, grad_w, grad_b


def _fake_unified_topk_backward(grad, x, weight, k, need_x, need_w, need_b):
    M, n_out = grad.shape
    n_in = weight.shape[1]
    return (
        grad.new_empty((M, n_in)) if need_x else grad.new_empty(0),
        grad.new_empty((n_out, n_in)) if need_w else grad.new_empty(0),
        grad.new_empty((n_out,)) if need_b else grad.new_empty(0),
    )


#: True when the kernels were built for Triton's interpreter (TRITON_INTERPRET=1 when
#: triton was imported). wrap_triton cannot trace interpreted kernels, so there the op is
#: an opaque custom op with a fake implementation (torch.compile keeps it as one node);
#: otherwise it is a triton_op, which torch.compile traces into.
INTERPRETED = type(_scores.partial_kernel).__name__ == "InterpretedFunction"

if INTERPRETED:
    _op = torch.library.custom_op(OP_NAME, mutates_args=())(_unified_topk_backward)
    _op.register_fake(_fake_unified_topk_backward)
else:
    _op = triton_op(OP_NAME, mutates_args=())(_unified_topk_backward)


def unified_topk_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    k: int,
    need_x: bool = True,
    need_w: bool = True,
    need_b: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Unified top-k meProp gradients of ``y = x W^T + b`` with the Triton kernels.

    Args:
        grad: ``(M, out)`` incoming gradient (any strides), fp32 / fp16 / bf16.
        x: ``(M, in)`` saved input (any strides), same dtype and device.
        weight: ``(out, in)``, same dtype and device.
        k: units kept, an int in ``[1, out]`` (``k = out`` gives the dense gradients).
        need_x, need_w, need_b: which gradients to compute.

    Returns ``(grad_x (M, in), grad_W (out, in), grad_b (out,))`` in grad's dtype, None
    where not asked for. The selection is the reference's exactly (scores ``sum |G|`` in
    fp32, NaN/inf as +inf, ties to the lower index); ``grad_b = grad.sum(0)`` is dense.
    CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1`` set before triton was
    first imported.
    """
    if grad.dim() != 2 or x.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"grad, x and weight must be 2-D; got {tuple(grad.shape)}, {tuple(x.shape)}, "
            f"{tuple(weight.shape)}"
        )
    M, n_out = grad.shape
    if tuple(weight.shape) != (n_out, x.shape[1]) or x.shape[0] != M:
        raise ValueError(
            f"shapes do not fit y = x W^T: grad {tuple(grad.shape)}, x {tuple(x.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    k = int(k)
    if not 1 <= k <= n_out:
        raise ValueError(f"k must lie in [1, out_features={n_out}]; got {k}")
    gx, gw, gb = torch.ops.meprop_triton.unified_topk_backward(
        grad, x, weight, k, bool(need_x), bool(need_w), bool(need_b)
    )
    return (gx if need_x else None, gw if need_w else None, gb if need_b else None)
