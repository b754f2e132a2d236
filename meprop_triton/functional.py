"""The meProp autograd Function, ``meprop_linear`` and backend dispatch.

The forward pass is always the ordinary ``F.linear``; only the backward changes.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from ._validation import check_linear_args, check_options, resolve_k

__all__ = ["meprop_linear", "MePropFunction", "resolve_backend", "triton_interpreter_enabled"]


def triton_interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _triton_kernels_available() -> bool:
    # The fused Triton backward is not part of this release yet; the torch path runs.
    return False


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs for ``backend`` on tensors that live on ``device``.

    ``"auto"`` picks the Triton kernels for CUDA tensors when they are available and the
    torch path otherwise. ``"triton"`` is refused, with the reason, where it cannot run.
    """
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_kernels_available() else "torch"
    if device.type != "cuda" and not triton_interpreter_enabled():
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
            f"triton is imported to run the kernels on CPU tensors; got tensors on "
            f"'{device}'. Use backend='torch' (or 'auto') for the pure-torch path."
        )
    if not _triton_kernels_available():
        raise RuntimeError(
            "backend='triton' was asked for, but this build of meprop-triton has no Triton "
            "meProp kernels; use backend='torch' (or 'auto')"
        )
    return "triton"


class MePropFunction(torch.autograd.Function):
    """``F.linear`` forward; unified top-k meProp backward.

    ``k`` is a resolved number of units (an int in [1, out]); ``k == out`` gives the
    exact dense gradient.
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, k: int, backend: str) -> Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, k, backend = inputs
        ctx.k = k
        ctx.backend = backend
        ctx.save_for_backward(x, weight)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        out_features, in_features = weight.shape
        grad = grad_output.reshape(-1, out_features)
        x2d = x.reshape(-1, in_features)
        flags = dict(need_input=need_x, need_weight=need_w, need_bias=need_b)
        if ctx.k >= out_features:
            gx, gw, gb = reference.dense_backward(grad, x2d, weight, **flags)
        else:
            idx = reference.unified_topk_indices(grad, ctx.k)
            gx, gw, gb = reference.unified_backward(grad, x2d, weight, idx, **flags)
        if gx is not None:
            gx = gx.reshape(x.shape)
        return gx, gw, gb, None, None


def meprop_linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    k,
    unified: bool = True,
    selection: str = "topk",
    sparse_grad: bool = False,
    backend: str = "auto",
    generator: torch.Generator | None = None,
) -> Tensor:
    """``F.linear(input, weight, bias)`` whose backward keeps only the top-k output units.

    Args:
        input: ``(..., in_features)``, any leading shape (1-D included).
        weight: ``(out_features, in_features)``.
        bias: ``(out_features,)`` or None. Its gradient is always dense and exact.
        k: an int >= 1 (a number of output units; values >= out_features give the dense
            gradient) or a float in (0, 1] (a fraction of out_features, rounded up).
        unified: one set of units for all leading positions (the only mode so far).
        selection: ``"topk"`` (by ``sum |grad|`` per output unit).
        sparse_grad: dense gradients (the only mode so far).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        generator: for ``selection="random"``.

    Every argument is checked before any work is done.
    """
    check_options(unified=unified, selection=selection, sparse_grad=sparse_grad, backend=backend)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    if isinstance(weight, Tensor) and weight.dim() == 2:
        k_units = resolve_k(k, weight.shape[0])
    else:
        k_units = None  # check_linear_args names the bad weight below
    if not unified:
        raise NotImplementedError("per-example meProp (unified=False) is not available in this release")
    if selection != "topk":
        raise NotImplementedError(f"selection={selection!r} is not available in this release; use 'topk'")
    if sparse_grad:
        raise NotImplementedError("sparse_grad=True is not available in this release")

    if (
        isinstance(input, Tensor)
        and isinstance(weight, Tensor)
        and torch.is_autocast_enabled(input.device.type)
    ):
        # Do autocast's cast here, differentiably, and save the low-precision copies.
        dtype = torch.get_autocast_dtype(input.device.type)

        def cast(t):
            # As autocast does for nn.Linear: float64 is left alone.
            if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64:
                return t.to(dtype)
            return t

        input, weight, bias = cast(input), cast(weight), cast(bias)
    check_linear_args(input, weight, bias)
    resolved = resolve_backend(backend, input.device)

    if not torch.is_grad_enabled() or not any(
        t is not None and t.requires_grad for t in (input, weight, bias)
    ):
        return F.linear(input, weight, bias)
    with torch.autocast(input.device.type, enabled=False):
        return MePropFunction.apply(input, weight, bias, k_units, resolved)
