"""Training helpers: gradient clipping that understands row-sparse (``sparse_grad=True``)
gradients, and a CPU allocator setting for training loops."""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["clip_grad_norm_", "keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse instead of handing it back to
    the operating system; True when the setting took effect.

    A CPU training step frees and reallocates the same tensors (gradients, activations,
    optimizer temporaries) every step. With glibc's default, growing thresholds, blocks
    of a few hundred KiB to a few MiB are often returned to the system when freed, and
    the next step faults their pages back in, each fault cost paid again every step:
    about 500 faults per step for MNIST's 784-500-500-10 MLP on a 2-core VM, where a
    step takes 4 to 5 ms. After this call blocks under ``mmap_threshold`` come from the
    heap, and the heap gives memory back only when more than ``trim_threshold`` bytes
    are free at its top. PyTorch's CPU tuning advice reaches the same end by preloading
    jemalloc or tcmalloc; this needs no extra library.

    It changes the whole process, so call it at the start of a training script (the
    ``meprop-mnist`` command does, unless ``--no-keep-freed-memory``). The equivalent
    environment, set before Python starts, is ``MALLOC_MMAP_THRESHOLD_=33554432
    MALLOC_TRIM_THRESHOLD_=268435456``. Returns False, changing nothing, off Linux or
    where the C library is not glibc (musl, or an allocator without ``mallopt``).
    """
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
            raise ValueError(f"{name} must be an int in [0, 2**31) bytes; got {value!r}")
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl's mallopt does nothing
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 for a value it refuses.
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) & bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))



@torch.no_grad()
def clip_grad_norm_(
    parameters: Tensor | Iterable[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for models that mix sparse and dense gradients.

    torch's version fails on sparse gradients before torch 2.14 (2.13 has no
    ``linalg_vector_norm`` kernel for sparse tensors; 2.14.1's gives the same result as
    this one). Here
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
