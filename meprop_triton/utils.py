"""Training helpers: gradient clipping that understands row-sparse (``sparse_grad=True``)
gradients, and two process settings for CPU training loops (the allocator's, and
flushing denormal floats to zero)."""

from __future__ import annotations

import ctypes
import math
import numbers
import os
import sys
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["clip_grad_norm_", "flush_denormals", "keep_freed_memory"]

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



def flush_denormals(enable: bool = True) -> bool:
    """Make this thread and torch's CPU worker threads treat denormal floats as zero
    (``enable=False``: as the IEEE numbers they are again); True when every one of them
    now does as asked.

    Why meProp training on a CPU needs it: a weight row that meProp leaves unselected
    gets an exactly zero gradient, so an optimizer with decaying state (Adam, AdamW,
    RMSprop, SGD with momentum) multiplies its moments for that row by beta at every
    step until they fall below 1.2e-38 (after about 750 steps at Adam's beta1 = 0.9)
    and then stay denormal for good: rounding keeps ``0.9 * x`` at ``x`` for the
    smallest ones. On Intel CPUs every operation on a denormal takes a slow microcode
    path. Measured in the MNIST MLP (784-500-500-10, batch 50, k = 80, fused Adam, 2
    threads, Intel Xeon): after about 700 steps 15% of Adam's state was denormal and
    the meProp step went from 2.7 to 3.9 ms while the dense one stayed at 2.7 ms; with
    this setting it stays at 2.7 ms. Dense training leaves fewer denormals (0.3% there)
    but gains a little too. A denormal moment is below anything that can move a weight
    (its update is about ``lr * 1e-38 / eps``), so training is unchanged otherwise.

    ``torch.set_flush_denormal`` sets the calling thread only, while torch's CPU
    operations run on a pool of OpenMP threads that keep the mode they had; this also
    sets it in that pool (through the OpenMP runtime's parallel entry point, on Linux
    with GNU OpenMP, which torch's wheels use), then checks: a multiply over denormal
    inputs spread across all of torch's threads must give zeros (with ``enable=False``:
    must not). It returns False, having changed nothing, where the CPU cannot flush
    denormals or where a worker thread did not take the mode; on another OpenMP runtime,
    calling it before the first parallel torch operation of the process works, since
    threads started later inherit the mode. OpenMP keeps a pool for each thread that
    starts parallel work: this sets the calling thread and its pool, so call it from
    the thread that trains (the main one, in a script), at the start of a CPU training
    script (``meprop-mnist`` and ``meprop-pos`` do on a CPU, unless
    ``--no-flush-denormals``). It is a CPU setting: nothing changes on a GPU.
    """
    if not isinstance(enable, bool):
        raise TypeError(f"enable must be True or False; got {enable!r}")
    if not torch.set_flush_denormal(enable):
        return False  # the CPU has no flush-to-zero (torch changed nothing)
    _set_worker_fp_mode()
    if _denormals_kept() == (0.0 if enable else 1.0):
        return True
    # Some worker kept its mode: undo, so that False means "as before", not half done.
    torch.set_flush_denormal(not enable)
    _set_worker_fp_mode()
    return False


def _set_worker_fp_mode() -> bool:
    """Copy this thread's floating-point control modes (x86's MXCSR: flush-to-zero and
    denormals-are-zero among them) to the OpenMP team torch's operations run on; False
    where there is no GNU OpenMP runtime or C library entry point to do it with."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split(None, 5)[-1].strip() for line in maps if "libgomp" in line}
    except OSError:
        return False
    try:
        libm = ctypes.CDLL("libm.so.6")
        getmode, setmode = libm.fegetmode, libm.fesetmode  # glibc 2.25 and later
    except (OSError, AttributeError):
        return False
    mode = ctypes.create_string_buffer(64)  # a femode_t (8 bytes on x86-64), with room
    if getmode(mode) != 0:
        return False
    done = False
    for path in sorted(paths):  # every copy loaded (torch's wheels bundle their own)
        try:
            parallel = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY).GOMP_parallel
        except (OSError, AttributeError):
            continue
        # GOMP_parallel(fn, data, num_threads, flags) runs fn(data) on every thread of
        # the calling thread's team (num_threads 0: as many as torch set), this one
        # included: here fn is fesetmode and data this thread's modes.
        parallel.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint)
        parallel.restype = None
        parallel(ctypes.cast(setmode, ctypes.c_void_p), ctypes.cast(mode, ctypes.c_void_p), 0, 0)
        done = True
    return done


def _denormals_kept() -> float:
    """The fraction of torch's CPU threads that keep denormals (0.0: all flush them):
    the smallest fp32 denormal (made from its bits, so that no conversion flushes it
    first), multiplied by one in one chunk per thread, gives zero in the chunks of the
    threads that flush."""
    threads = max(torch.get_num_threads(), 1)
    chunk = 1 << 16  # 64 Ki floats a thread: above torch's grain, so every thread gets one
    tiny = torch.ones(threads * chunk, dtype=torch.int32).view(torch.float32)
    kept = torch.mul(tiny, 1.0).ne(0).sum().item()
    return kept / (threads * chunk)


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
    # As torch's: a number, a one-element tensor, or a string such as 'inf' for norm_type.
    if isinstance(max_norm, Tensor) and max_norm.numel() == 1:
        max_norm = max_norm.item()
    if isinstance(norm_type, Tensor) and norm_type.numel() == 1:
        norm_type = norm_type.item()
    if isinstance(norm_type, str):
        try:
            norm_type = float(norm_type)
        except ValueError:
            raise ValueError(f"norm_type must be a real number or 'inf'; got {norm_type!r}") from None
    for name, value in (("max_norm", max_norm), ("norm_type", norm_type)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
            raise ValueError(f"{name} must be a real number; got {value!r}")
    if max_norm < 0:
        raise ValueError(f"max_norm must be >= 0 (a negative one would flip every gradient's sign); got {max_norm!r}")
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    max_norm, norm_type = float(max_norm), float(norm_type)
    values, coalesced = [], []
    for p in parameters:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            g = p.grad if p.grad.is_coalesced() else p.grad.coalesce()
            if g is not p.grad:
                coalesced.append((p, g))  # put in place only once the call cannot fail
            values.append(g._values())
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
    for p, g in coalesced:
        p.grad = g
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for v in values:
        v.mul_(coef.to(v.device, v.dtype))
    return total
