"""Training helpers that also understand row-sparse (``sparse_grad=True``) gradients."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["clip_grad_norm_"]


@torch.no_grad()
def clip_grad_norm_(
    parameters: Tensor | Iterable[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for models that mix sparse and dense gradients.

    torch's version refuses sparse gradients (no norm kernel for sparse tensors). Here
    a sparse gradient is coalesced in place (duplicate rows from several backward passes
    summed) and its stored values count towards the norm and are scaled. Returns the
    total norm, as torch's does.
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    max_norm, norm_type = float(max_norm), float(norm_type)
    values = []
    for p in parameters:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            if not p.grad.is_coalesced():
                p.grad = p.grad.coalesce()
            values.append(p.grad._values())
        else:
            values.append(p.grad)
    if not values:
        return torch.tensor(0.0)
    device = values[0].device
    norms = [torch.linalg.vector_norm(v, norm_type).to(device) for v in values]
    total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(
            f"the total norm of order {norm_type} of the gradients is non-finite, so it "
            f"cannot be clipped; pass error_if_nonfinite=False to clip anyway"
        )
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for v in values:
        v.mul_(coef.to(v.device, v.dtype))
    return total
