"""Whether Triton's interpreter (``TRITON_INTERPRET=1``) computes a bfloat16 ``tl.dot``
right.

The interpreter keeps bf16 values as their raw 16 bits (numpy has no bf16) and casts
them correctly, but its ``tl.dot`` (triton 3.6 to 3.9 at least) multiplies those bits as
integers: a 16 x 16 product comes out near 1e10. Every GEMM kernel here would then give
wrong bf16 gradients without a sign, so ``backend="triton"`` refuses bf16 CPU tensors
where a 16 x 16 probe shows it. The probe runs once per interpreter ``create_dot``
(a fixed triton, or a harness that mends the dot as the test suite does, passes it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["bf16_dot_ok"]

_RESULTS: dict = {}


@triton.jit
def _dot16_kernel(a_ptr, b_ptr, c_ptr):
    r = tl.arange(0, 16)
    a = tl.load(a_ptr + r[:, None] * 16 + r[None, :])
    b = tl.load(b_ptr + r[:, None] * 16 + r[None, :])
    tl.store(c_ptr + r[:, None] * 16 + r[None, :], tl.dot(a, b))


def bf16_dot_ok() -> bool:
    """True when a bf16 ``tl.dot`` in the interpreter equals the exact product (small
    integers, exact in bf16 and in the fp32 sum). Only for interpreter runs: it launches
    on CPU tensors."""
    from triton.runtime import interpreter

    key = getattr(getattr(interpreter, "InterpreterBuilder", None), "create_dot", None)
    if key not in _RESULTS:
        a = (torch.arange(256, dtype=torch.float32).reshape(16, 16) % 7 - 3).to(torch.bfloat16)
        b = (torch.arange(256, dtype=torch.float32).reshape(16, 16) % 5 - 2).to(torch.bfloat16)
        c = torch.full((16, 16), float("nan"))
        try:
            _dot16_kernel[(1,)](a, b, c)
            ok = torch.equal(c, a.float() @ b.float())
        except Exception:  # noqa: BLE001 - an interpreter that cannot run it cannot run the kernels either
            ok = False
        _RESULTS[key] = ok
    return _RESULTS[key]
