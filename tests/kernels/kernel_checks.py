"""Mode selection and checks shared by the Triton kernel tests (see conftest.py)."""

from __future__ import annotations

import importlib
import math
import os
import sys

import numpy as np
import pytest
import torch

CUDA = torch.cuda.is_available()
_env = os.environ.get("TRITON_INTERPRET")
INTERPRET = _env.strip().lower() in ("1", "true", "yes", "on") if _env is not None else not CUDA
DEVICE = "cpu" if INTERPRET else "cuda"

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def compiled_env(*paths: str) -> dict:
    """The environment for a subprocess that builds the kernels for real (AOT builds, the
    code-generation report, compile traces, host timing) beside interpreter tests: this
    one's without ``TRITON_INTERPRET``, the checkout's root and ``paths`` first on
    ``PYTHONPATH``, and Triton's FP-fusion default stated (silencing its warning)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *map(str, paths), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


#: the dtypes every kernel takes, and their test ids
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]

KERNEL_MODULES = (
    "meprop_triton.kernels.scores",
    "meprop_triton.kernels.topk",
    "meprop_triton.kernels.matmul",
    "meprop_triton.kernels.per_example",
    "meprop_triton.triton_ops",
)


MODE_ERROR: str | None = None


def _import_kernels() -> None:
    """Import triton and the kernel modules with TRITON_INTERPRET set as chosen.

    Triton fixes the mode when a function is decorated, and ``triton.language`` decorates
    its own helpers (``tl.zeros``...) when triton is first imported: so the variable must
    be set before triton's first import, then it is put back as it was.
    """
    global MODE_ERROR
    already = "triton" in sys.modules
    if INTERPRET:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        try:
            import triton.language.standard as tl_standard
        except ImportError:  # pragma: no cover - triton is a dependency on Linux
            MODE_ERROR = "triton is not installed"
            return
        for name in KERNEL_MODULES:
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as e:  # triton_ops is optional
                if e.name != name:
                    raise
    finally:
        if _env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = _env
    from meprop_triton.kernels import scores

    import triton

    if INTERPRET and _version(triton.__version__) < (3, 7) and _version(np.__version__) >= (2, 4):
        # triton 3.6's interpreter turns a scalar argument into an int with
        # ``int(handle.data)``, a 1-element 1-D array, which numpy 2.4 refuses ("only
        # 0-dimensional arrays can be converted to Python scalars"): every loop with a
        # runtime bound (``for c in range(0, N, BLOCK)``) fails. triton 3.7+ squeezes first.
        MODE_ERROR = (
            f"triton {triton.__version__}'s interpreter cannot run loops with runtime bounds "
            f"under numpy {np.__version__} (it calls int() on a 1-element array, refused "
            f"since numpy 2.4); install numpy<2.4 to run the interpreter tests with it"
        )
        return
    modes = {
        type(tl_standard.zeros).__name__ == "InterpretedFunction",
        type(scores.partial_kernel).__name__ == "InterpretedFunction",
    }
    if modes != {INTERPRET}:
        MODE_ERROR = (
            f"triton{' (imported earlier)' if already else ''} or meprop_triton.kernels was "
            f"imported in the wrong Triton mode (interpreter wanted: {INTERPRET}); set "
            f"TRITON_INTERPRET before starting pytest"
        )


def _emulate_bf16_dot() -> bool:
    """Make the interpreter's ``tl.dot`` right for bf16 operands; True once it is.

    The interpreter keeps bf16 values as their raw 16 bits (numpy has no bf16) and casts
    them correctly, but its ``tl.dot`` multiplies those bits as integers. On a GPU a bf16
    ``tl.dot`` multiplies exactly and accumulates in fp32; widening each operand to fp32
    (exact: the bits shifted left by 16) before the interpreter's fp32 matmul does the
    same, so the GEMM kernels' bf16 paths are checked against the reference on a CPU.
    Only ``tl.dot`` is changed: an arithmetic op on raw bf16 elsewhere in a kernel would
    still give garbage here, and a test would show it. A dot with a bf16 accumulator is
    refused (no kernel has one)."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover
        return False
    builder = getattr(interpreter, "InterpreterBuilder", None)
    handle = getattr(interpreter, "TensorHandle", None)
    if builder is None or handle is None or not hasattr(builder, "create_dot"):
        return False  # a triton laid out otherwise: bf16 dots stay skipped
    original = builder.create_dot
    if getattr(original, "_meprop_bf16", False):
        return True
    import triton.language as tl

    def widen(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        return handle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, *args, **kwargs):
        if tl.bfloat16 in (a.dtype.scalar, b.dtype.scalar):
            if d.dtype.scalar == tl.bfloat16:
                raise NotImplementedError("emulated bf16 tl.dot: accumulate in fp32")
            a, b = widen(a), widen(b)
        return original(self, a, b, d, *args, **kwargs)

    create_dot._meprop_bf16 = True
    create_dot._meprop_original = original  # for the test of the package's own refusal
    builder.create_dot = create_dot
    return True


def _version(v: str) -> tuple:
    parts = []
    for p in v.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


_import_kernels()

#: bf16 ``tl.dot`` works in this mode (on a GPU, or in the interpreter with the emulation)
BF16_DOT = not INTERPRET or (MODE_ERROR is None and _emulate_bf16_dot())


def skip_unsupported(dtype, *, dot: bool = True) -> None:
    """Skip bf16 for kernels that use ``tl.dot`` where it cannot run: in an interpreter
    that :func:`_emulate_bf16_dot` could not mend."""
    if dot and dtype == torch.bfloat16 and not BF16_DOT:
        pytest.skip("bf16 tl.dot is wrong in this triton's interpreter: bf16 is checked on a GPU only")


def randn(shape, dtype, rng, device):
    """Fresh random values (never zeros), made on CPU from ``rng`` then moved."""
    return torch.randn(shape, generator=rng, dtype=torch.float32).to(dtype).to(device)


def poisoned(shape, dtype, device):
    """A buffer an unwritten element cannot pass: NaN (floats) or -1 (integers)."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, -1, dtype=dtype, device=device)


def strided_copy(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as ``t`` (2-D) in another memory layout."""
    if kind == "contiguous":
        return t.contiguous()
    if kind == "transposed":  # column-major
        return t.t().contiguous().t()
    if kind == "padded":  # every other row and column of a bigger tensor: no unit stride
        rows, cols = t.shape
        big = torch.full((2 * rows + 1, 2 * cols + 3), float("nan"), dtype=t.dtype, device=t.device)
        view = big[1 : 1 + 2 * rows : 2, 1 : 1 + 2 * cols : 2]
        view.copy_(t)
        return view
    if kind == "expanded":  # stride 0 rows, as autograd hands out for y.sum()
        return t[:1].expand(t.shape[0], t.shape[1])
    raise ValueError(kind)


#: Triton against the torch path (``assert_close``): both round the same products to the
#: dtype, summed in different orders.
BACKEND_TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float16: dict(rtol=2e-2, atol=2e-2),
    torch.bfloat16: dict(rtol=4e-2, atol=4e-2),
}


UNIT_ROUNDOFF = {
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}


def assert_reduction_close(got, exact, abs_bound, length: int, *, in_round: float = 0.0, what: str = ""):
    """``|got - exact| <= 2 (length u_fp32 + in_round) abs_bound + 2 u_out |exact| + sub_out``.

    ``exact``/``abs_bound`` are fp64 (numpy or torch): the exact result and the same
    reduction over absolute values. fp32 accumulation of ``length`` terms gives the first
    term, rounding the result to ``got``'s dtype the second (``sub_out``, the spacing of
    its subnormals, covers results that round into that range: 6e-8 for fp16, 1.4e-45
    for fp32); ``in_round`` covers inputs rounded inside the kernel (tf32). Non-finite
    entries of ``exact`` must be matched exactly (NaN where NaN, the same infinity).
    """
    g = got.detach().to(torch.float64).cpu()
    e = torch.as_tensor(exact, dtype=torch.float64)
    b = torch.as_tensor(abs_bound, dtype=torch.float64)
    assert tuple(g.shape) == tuple(e.shape), f"{what}: shape {tuple(g.shape)} != {tuple(e.shape)}"
    fin = torch.isfinite(e)
    nonfin_ok = torch.where(torch.isnan(e), torch.isnan(g), g == e)
    bad_nonfin = ~fin & ~nonfin_ok
    assert not bad_nonfin.any(), f"{what}: {int(bad_nonfin.sum())} non-finite entries differ"
    fi = torch.finfo(got.dtype)
    u_out = UNIT_ROUNDOFF[got.dtype]
    tol = 2 * (length * UNIT_ROUNDOFF[torch.float32] + in_round) * b + 2 * u_out * e.abs() + fi.smallest_normal * fi.eps
    err = (g - e).abs()
    bad = fin & ~(err <= tol)  # NaN in g at a finite place counts as bad
    if bad.any():
        excess = torch.where(bad, (err / tol).nan_to_num(math.inf), torch.zeros_like(err))
        at = tuple(int(v) for v in divmod_index(int(excess.argmax()), tuple(e.shape)))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} entries off; worst at {at}: got "
            f"{float(g[at]):.6e}, exact {float(e[at]):.6e}, tolerance {float(tol[at]):.3e}"
        )


def divmod_index(flat: int, shape: tuple) -> tuple:
    out = []
    for n in reversed(shape):
        flat, r = divmod(flat, n)
        out.append(r)
    return tuple(reversed(out))


def tf32_round(dtype) -> float:
    """Relative input rounding of tl.dot for ``dtype`` under the current torch settings."""
    if dtype == torch.float32 and DEVICE == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return 2.0**-11
    return 0.0


def f64(t) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()
