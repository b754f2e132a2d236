"""Launch helpers shared by the kernel files: config selection and argument checks.

Nothing here touches CUDA at import time; device properties are read on the first
launch for a device and cached.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = [
    "SUPPORTED_DTYPES",
    "FORCE_SINGLE_CONFIG",
    "single_config_mode",
    "interpreter_enabled",
    "num_sms",
    "capability",
    "shared_memory_limit",
    "check_float_tensor",
    "check_index",
    "check_out",
    "out_or_empty",
    "launchable",
    "is_interpreted",
    "cdiv",
]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: ``None``: follow the environment (``MEPROP_TRITON_TEST_CONFIG=1`` or
#: ``TRITON_INTERPRET=1`` -> one fixed config per kernel, no autotuning);
#: ``True`` / ``False``: force single-config mode on / off.
FORCE_SINGLE_CONFIG: bool | None = None


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for the host's grid arithmetic. ``triton.cdiv`` gives the same
    numbers, but it is a ``constexpr_function``: about 1.8 us a call on the host, where a
    backward makes a dozen such calls."""
    return -(-a // b)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def interpreter_enabled() -> bool:
    return _env_flag("TRITON_INTERPRET")


def single_config_mode() -> bool:
    """True when each kernel runs with its one test config instead of autotuning.

    Read at launch time, never at import: tests set ``MEPROP_TRITON_TEST_CONFIG=1`` (or the
    module switch :data:`FORCE_SINGLE_CONFIG`); the interpreter always uses it, since
    benchmarking configs there measures nothing.
    """
    if FORCE_SINGLE_CONFIG is not None:
        return bool(FORCE_SINGLE_CONFIG)
    return _env_flag("MEPROP_TRITON_TEST_CONFIG") or interpreter_enabled()


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small fixed number off CUDA)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_sm_count(index)
    return 4


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of ``device``; off CUDA (the interpreter) that of a Hopper GPU,
    so that the configs chosen there are the ones sm_90 runs."""
    if device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_capability(index)
    return (9, 0)


@functools.lru_cache(maxsize=None)
def _cuda_shared_limit(index: int) -> int | None:
    props = torch.cuda.get_device_properties(index)
    return getattr(props, "shared_memory_per_block_optin", None)


def shared_memory_limit(device) -> int | None:
    """Shared memory a block of ``device`` may use (its opt-in maximum), None off CUDA
    or where torch does not report it."""
    if device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_shared_limit(index)
    return None


def check_float_tensor(name: str, t: torch.Tensor, dim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D; got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"the Triton kernels take float32, float16 or bfloat16; {name} has dtype {t.dtype} "
            f"(use the torch path for other dtypes)"
        )
    if t.device.type != "cuda" and not interpreter_enabled():
        raise RuntimeError(
            f"the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
            f"imported to run on CPU tensors; {name} is on '{t.device}'"
        )


def check_index(name: str, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A 1-D int64 index vector on ``device``, made contiguous (the kernels read it flat)."""
    if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.dtype != torch.int64:
        got = f"{idx.dtype} of shape {tuple(idx.shape)}" if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise TypeError(f"{name} must be a 1-D int64 tensor; got {got}")
    if idx.device != device:
        raise ValueError(f"{name} is on '{idx.device}' but the data is on '{device}'")
    return idx.contiguous()


def check_out(name: str, out: torch.Tensor, shape, dtype, device) -> None:
    """Check a caller-provided output buffer (tests pass NaN-filled ones)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"{name} must have shape {tuple(shape)}, dtype {dtype} on '{device}'; got "
            f"{tuple(out.shape)}, {out.dtype} on '{out.device}'"
        )


def out_or_empty(name: str, out: torch.Tensor | None, shape, dtype, device) -> torch.Tensor:
    """``out`` when the caller gave one (checked as :func:`check_out` does), else a new
    uninitialised tensor of that shape, dtype and device."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    check_out(name, out, shape, dtype, device)
    return out


def is_interpreted(kernel) -> bool:
    """Whether ``kernel`` (a ``triton.jit`` function, or an autotuner over one) was built
    for Triton's interpreter (``TRITON_INTERPRET=1`` when triton was imported)."""
    return type(kernel).__name__ == "InterpretedFunction" or (
        type(getattr(kernel, "fn", None)).__name__ == "InterpretedFunction"
    )


def launchable(kernel, traceable: bool):
    """``kernel`` itself, or wrapped with ``torch.library.wrap_triton`` when ``traceable``.

    Launchers called from a ``torch.library.triton_op`` pass ``traceable=True`` so that
    ``torch.compile`` sees the launch (inside the op in eager mode the wrapper hands back
    the kernel itself). Direct eager calls skip the wrapper: its dispatch costs ~1 ms.
    A kernel built for Triton's interpreter is returned as it is: the ops are opaque
    custom ops there (``triton_ops.INTERPRETED``), so nothing traces the launch, and
    torch 2.11's ``wrap_triton`` refuses such a kernel even where it would not wrap it.
    """
    if not traceable or is_interpreted(kernel):
        return kernel
    from torch.library import wrap_triton

    return wrap_triton(kernel)
