"""The compacted meProp products, gathering the selected units inside the GEMM loads.

With ``S = idx`` (k selected output units, int64, any order; ascending from
:mod:`.topk` keeps the gathers as local as they can be):

* :func:`gathered_grad_input`: ``grad_x = G[:, S] @ W[S, :]`` -- an ``(M, in)`` GEMM whose
  reduction runs over the k selected units. Each K step loads one tile of ``S`` and uses it
  for both operands: the columns ``G[rows, S_tile]`` and the rows ``W[S_tile, cols]``.
* :func:`scattered_grad_weight`: the dense ``grad_W`` written in one launch. The first
  programs compute ``(G[:, S]^T @ X)`` tiles and store them straight into rows ``S`` of
  ``grad_W``; the remaining programs write zeros into the ``out - k`` other rows (given by
  ``rest``, the complement from :func:`.topk.topk_indices`). Every element of ``grad_W``
  is written exactly once: no ``zeros()`` + ``index_copy_``, no ``(M, k)`` copy of G.

Both accumulate in fp32 with ``tl.dot`` (tf32 for fp32 inputs only when
``torch.backends.cuda.matmul.allow_tf32`` is True) and store in the input dtype. Offsets
are int64; all strides are runtime arguments, so strided inputs need no copy. Programs
are ordered in groups of ``GROUP_M`` row tiles (L2 reuse of the gathered operand).
Results are deterministic: no atomics, one program owns each output tile.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _launch

__all__ = [
    "gathered_grad_input",
    "scattered_grad_weight",
    "grad_input_configs",
    "grad_weight_configs",
    "grad_input_kernel",
    "grad_weight_kernel",
    "input_precision_for",
]


def _cfg(bm, bn, bk, warps, stages, group=8):
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
        num_warps=warps, num_stages=stages,
    )


def grad_input_configs() -> list:
    """Autotune configs of :func:`grad_input_kernel`; the first is the single test config.

    BLOCK_M: rows of G (tokens); BLOCK_N: columns of grad_x (in); BLOCK_K: selected units.
    """
    return [
        _cfg(32, 64, 32, 4, 2),
        _cfg(64, 64, 32, 4, 3),
        _cfg(64, 128, 32, 4, 4),
        _cfg(128, 64, 32, 4, 4),
        _cfg(128, 128, 32, 8, 3),
        _cfg(128, 256, 32, 8, 3),
    ]


def grad_weight_configs() -> list:
    """Autotune configs of :func:`grad_weight_kernel`; the first is the single test config.

    BLOCK_M: selected units (rows of grad_W); BLOCK_N: in; BLOCK_K: tokens (the reduction).
    Small BLOCK_M matters: k is often only a few hundred, and the product tiles must still
    cover the GPU (the zero-row programs run beside them).
    """
    return [
        _cfg(32, 64, 32, 4, 2),
        _cfg(32, 128, 64, 4, 3),
        _cfg(64, 64, 64, 4, 3),
        _cfg(64, 128, 32, 4, 4),
        _cfg(128, 128, 32, 8, 3),
        _cfg(64, 256, 32, 8, 3),
    ]


def input_precision_for(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: tf32 for fp32 only where torch allows it."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@triton.jit
def _tile_ids(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row tiles walk the column tiles together (L2 reuse)."""
    width = GROUP_M * num_pid_n
    group = pid // width
    first_m = group * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size
    return pid_m, pid_n


@triton.jit
def grad_input_kernel(
    g_ptr, w_ptr, idx_ptr, out_ptr,
    M, N, K,
    stride_gm, stride_gn, stride_wo, stride_wi, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """``out[M, N] = G[:, idx] @ W[idx, :]``; ``N`` = in_features, ``K`` = len(idx)."""
    pid = tl.program_id(0)
    pid_m, pid_n = _tile_ids(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    g_rows = g_ptr + rm[:, None] * stride_gm  # [BM, 1]
    w_cols = w_ptr + rn[None, :] * stride_wi  # [1, BN]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        sel = tl.load(idx_ptr + kk, mask=k_ok, other=0)  # the index tile, once per step
        a = tl.load(g_rows + sel[None, :] * stride_gn, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_cols + sel[:, None] * stride_wo, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    out = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def grad_weight_kernel(
    g_ptr, x_ptr, idx_ptr, rest_ptr, out_ptr,
    M, N, K, R,
    stride_gm, stride_gn, stride_xm, stride_xi, stride_wo, stride_wi,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Rows ``idx`` of ``out`` get ``G[:, idx]^T @ X``; rows ``rest`` get zeros.

    ``M`` tokens (the reduction), ``N`` = in_features, ``K`` = len(idx), ``R`` = len(rest).
    Programs ``[0, P)`` are the product tiles, ``[P, P + Z)`` the zero tiles.
    """
    pid = tl.program_id(0)
    num_pid_k = tl.cdiv(K, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_prod = num_pid_k * num_pid_n
    if pid < num_prod:
        pid_r, pid_n = _tile_ids(pid, num_pid_k, num_pid_n, GROUP_M)
        rr = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
        r_ok = rr < K
        sel = tl.load(idx_ptr + rr, mask=r_ok, other=0)  # the index tile, once per block
        rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        rt = tl.arange(0, BLOCK_K).to(tl.int64)
        g_cols = g_ptr + sel[:, None] * stride_gn  # A[i, t] = G[t, idx[i]]
        x_cols = x_ptr + rn[None, :] * stride_xi
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for t0 in range(0, M, BLOCK_K):
            t = t0 + rt
            t_ok = t < M
            a = tl.load(g_cols + t[None, :] * stride_gm, mask=r_ok[:, None] & t_ok[None, :], other=0.0)
            b = tl.load(x_cols + t[:, None] * stride_xm, mask=t_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        out = out_ptr + sel[:, None] * stride_wo + rn[None, :] * stride_wi
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & n_ok[None, :])
    else:
        z = pid - num_prod
        pid_r = z // num_pid_n
        pid_n = z % num_pid_n
        rr = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
        r_ok = rr < R
        rows = tl.load(rest_ptr + rr, mask=r_ok, other=0)
        rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=out_ptr.dtype.element_ty)
        out = out_ptr + rows[:, None] * stride_wo + rn[None, :] * stride_wi
        tl.store(out, zero, mask=r_ok[:, None] & n_ok[None, :])


@functools.cache
def _autotuned(which: str):
    # Built on first use: triton.autotune touches no device, but keeping the configs in a
    # function means one list serves the autotuner, the single-config mode and the AOT tests.
    if which == "grad_input":
        return triton.autotune(configs=grad_input_configs(), key=["M", "N", "K"])(grad_input_kernel)
    return triton.autotune(configs=grad_weight_configs(), key=["M", "N", "K"])(grad_weight_kernel)


def _launch_kernel(which, kernel, grid_of, args, precision, config):
    """Launch with ``config`` (a triton.Config), the single test config, or the autotuner."""
    if config is None and _launch.single_config_mode():
        config = (grad_input_configs if which == "grad_input" else grad_weight_configs)()[0]
    if config is not None:
        meta = dict(config.kwargs)
        kernel[grid_of(meta)](
            *args, **meta, INPUT_PRECISION=precision,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    else:
        _autotuned(which)[grid_of](*args, INPUT_PRECISION=precision)


def _check_operands(grad, other, other_name, idx):
    _launch.check_float_tensor("grad", grad, 2)
    _launch.check_float_tensor(other_name, other, 2)
    if other.dtype != grad.dtype or other.device != grad.device:
        raise TypeError(
            f"grad and {other_name} must share dtype and device; got {grad.dtype} on "
            f"'{grad.device}' and {other.dtype} on '{other.device}'"
        )
    return _launch.check_index("idx", idx, grad.device)


def gathered_grad_input(
    grad: torch.Tensor,
    weight: torch.Tensor,
    idx: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    config=None,
) -> torch.Tensor:
    """``grad[:, idx] @ weight[idx, :]`` without copying the selected columns or rows.

    ``grad: (M, out_features)``, ``weight: (out_features, in_features)``, ``idx``: 1-D
    int64 (k >= 1 entries, valid unit indices). Returns ``(M, in_features)`` in grad's
    dtype. ``out``: optional preallocated result (any strides); ``config``: force one
    ``triton.Config`` from :func:`grad_input_configs` (tests).
    """
    idx = _check_operands(grad, weight, "weight", idx)
    M, n_out = grad.shape
    if weight.shape[0] != n_out:
        raise ValueError(f"weight {tuple(weight.shape)} does not match grad {tuple(grad.shape)}")
    n_in = weight.shape[1]
    K = idx.shape[0]
    if out is None:
        out = torch.empty((M, n_in), dtype=grad.dtype, device=grad.device)
    else:
        _launch.check_out("out", out, (M, n_in), grad.dtype, grad.device)
    if M == 0 or n_in == 0:
        return out
    if K == 0:
        return out.zero_()

    def grid_of(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(n_in, meta["BLOCK_N"]),)

    args = (
        grad, weight, idx, out, M, n_in, K,
        grad.stride(0), grad.stride(1), weight.stride(0), weight.stride(1),
        out.stride(0), out.stride(1),
    )
    _launch_kernel("grad_input", grad_input_kernel, grid_of, args, input_precision_for(grad.dtype), config)
    return out


def complement(idx: torch.Tensor, n: int) -> torch.Tensor:
    """The indices in ``[0, n)`` not in ``idx``, ascending (a torch fallback for ``rest``)."""
    keep = torch.ones(n, dtype=torch.bool, device=idx.device)
    keep[idx] = False
    return keep.nonzero().flatten()


def scattered_grad_weight(
    grad: torch.Tensor,
    x: torch.Tensor,
    idx: torch.Tensor,
    rest: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    config=None,
) -> torch.Tensor:
    """The dense ``(out_features, in_features)`` weight gradient of unified meProp.

    Rows ``idx`` hold ``grad[:, idx]^T @ x``; every other row is zero. ``grad: (M, out)``,
    ``x: (M, in)``, ``idx``: 1-D int64 of distinct unit indices; ``rest``: the other
    indices (from ``topk_indices(..., return_rest=True)``; computed here when None).
    ``idx`` and ``rest`` together must cover every row once. ``out``: optional
    preallocated result (any strides); ``config``: force one ``triton.Config`` (tests).
    """
    idx = _check_operands(grad, x, "x", idx)
    M, n_out = grad.shape
    if x.shape[0] != M:
        raise ValueError(f"x {tuple(x.shape)} and grad {tuple(grad.shape)} need the same rows")
    n_in = x.shape[1]
    K = idx.shape[0]
    if rest is None:
        rest = complement(idx, n_out)
    rest = _launch.check_index("rest", rest, grad.device)
    R = rest.shape[0]
    if K + R != n_out:
        raise ValueError(f"idx ({K}) and rest ({R}) must together list all {n_out} rows")
    if out is None:
        out = torch.empty((n_out, n_in), dtype=grad.dtype, device=grad.device)
    else:
        _launch.check_out("out", out, (n_out, n_in), grad.dtype, grad.device)
    if n_out == 0 or n_in == 0:
        return out

    def grid_of(meta):
        bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
        n_tiles = triton.cdiv(n_in, bn)
        return ((triton.cdiv(K, bm) + triton.cdiv(R, bm)) * n_tiles,)

    args = (
        grad, x, idx, rest, out, M, n_in, K, R,
        grad.stride(0), grad.stride(1), x.stride(0), x.stride(1),
        out.stride(0), out.stride(1),
    )
    _launch_kernel("grad_weight", grad_weight_kernel, grid_of, args, input_precision_for(grad.dtype), config)
    return out
