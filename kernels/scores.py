"""Column scores and bias gradient of G in one pass.

For ``G: (M, out)`` (any strides) this computes, with fp32 accumulation,

* ``scores[j] = sum_m |G[m, j]|`` as fp32, a NaN or inf score mapped to +inf;
* ``grad_b[j] = sum_m G[m, j]`` in G's dtype (dense and exact, as ``G.sum(0)``).

Both come from the same loads of G. The reduction is deterministic: when M is split over
several programs to fill the GPU, each program writes fp32 partial sums for its slice of
rows to a workspace and a second small kernel adds the slices in a fixed order (no float
atomics), so the same input gives bit-identical output run after run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch

__all__ = ["column_scores_and_bias", "column_score_parts", "configs", "partial_kernel", "finish_kernel", "add_slices"]


def configs() -> list[dict]:
    """The launch configs this file ships (one each: the pass is bandwidth-bound).

    ``partial``: block of the split-M pass; ``finish``: block of the fixed-order sum.
    """
    return [
        {
            "partial": {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 4},
            "finish": {"BLOCK_N": 256, "num_warps": 4},
        }
    ]


@triton.jit
def partial_kernel(
    g_ptr, score_ptr, bias_ptr,
    M, N, stride_gm, stride_gn, rows_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FINAL: tl.constexpr,
):
    """Program (n, s): columns ``[n*BLOCK_N, ...)`` over rows ``[s*rows_per_split, ...)``.

    ``FINAL``: one split only, write the finished scores (NaN/inf -> +inf) and bias in
    ``bias_ptr``'s dtype. Otherwise write fp32 partials ``score_ptr[s, :]`` and
    ``bias_ptr[s, :]`` (row length N) for :func:`finish_kernel`.
    """
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    row_start = pid_s * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, M)
    rows0 = tl.arange(0, BLOCK_M).to(tl.int64)
    col_off = cols[None, :] * stride_gn

    acc_abs = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_sum = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # Software-pipelined (num_stages): the tiles of the next three steps are in flight
    # as asynchronous copies (cp.async) while this one is added. A plain loop compiles
    # to loads that ptxas staggers between the adds, one or two 16-byte loads in flight
    # per thread (sm_90 SASS, triton 3.6 and 3.9), too few to stream G at full bandwidth:
    # the H200 read it at 1.6 TB/s (41 us at 8192 x 4096, bf16).
    for m0 in tl.range(row_start, row_end, BLOCK_M, num_stages=4):
        rows = m0 + rows0
        mask = (rows < row_end)[:, None] & col_ok[None, :]
        g = tl.load(g_ptr + rows[:, None] * stride_gm + col_off, mask=mask, other=0.0).to(tl.float32)
        acc_abs += tl.abs(g)
        acc_sum += g
    s = tl.sum(acc_abs, axis=0)
    b = tl.sum(acc_sum, axis=0)

    if FINAL:
        s = tl.where(s == s, s, float("inf"))  # NaN -> +inf (inf stays inf)
        tl.store(score_ptr + cols, s, mask=col_ok)
        tl.store(bias_ptr + cols, b.to(bias_ptr.dtype.element_ty), mask=col_ok)
    else:
        tl.store(score_ptr + pid_s * N + cols, s, mask=col_ok)
        tl.store(bias_ptr + pid_s * N + cols, b, mask=col_ok)


@triton.jit
def add_slices(s, b, abs_ptrs, sum_ptrs, i, SPLIT, N, cols, ok):
    """``(s, b)`` plus row slices ``i .. i + 3`` of the fp32 partial sums (``abs_ptrs`` /
    ``sum_ptrs``: slice 0's pointers for these columns, slices N elements apart; ``ok``:
    the columns in range), added one by one in index order. Their eight loads are issued
    before the adds, one wait on memory per four slices. A slice past SPLIT adds +0.0 to
    a sum that started at +0.0, which changes no bit of it: the result is the plain
    sequential sum's, which ``finish_kernel`` and ``topk_kernel``'s ``FROM_PARTS`` share."""
    # lanes of a slice past SPLIT masked off (a limit of 0 columns)
    ok1 = cols < tl.where(i + 1 < SPLIT, N, 0)
    ok2 = cols < tl.where(i + 2 < SPLIT, N, 0)
    ok3 = cols < tl.where(i + 3 < SPLIT, N, 0)
    off = i * N
    s0 = tl.load(abs_ptrs + off, mask=ok, other=0.0)
    s1 = tl.load(abs_ptrs + (off + N), mask=ok1, other=0.0)
    s2 = tl.load(abs_ptrs + (off + 2 * N), mask=ok2, other=0.0)
    s3 = tl.load(abs_ptrs + (off + 3 * N), mask=ok3, other=0.0)
    b0 = tl.load(sum_ptrs + off, mask=ok, other=0.0)
    b1 = tl.load(sum_ptrs + (off + N), mask=ok1, other=0.0)
    b2 = tl.load(sum_ptrs + (off + 2 * N), mask=ok2, other=0.0)
    b3 = tl.load(sum_ptrs + (off + 3 * N), mask=ok3, other=0.0)
    return (((s + s0) + s1) + s2) + s3, (((b + b0) + b1) + b2) + b3


@triton.jit
def finish_kernel(
    part_abs_ptr, part_sum_ptr, score_ptr, bias_ptr,
    N, SPLIT,
    BLOCK_N: tl.constexpr,
):
    """Sum the ``SPLIT`` fp32 partial rows in index order (four a step,
    :func:`add_slices`); map NaN to +inf; cast the bias."""
    pid = tl.program_id(0).to(tl.int64)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = cols < N
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    b = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i in range(0, SPLIT, 4):
        s, b = add_slices(s, b, part_abs_ptr + cols, part_sum_ptr + cols, i, SPLIT, N, cols, ok)
    s = tl.where(s == s, s, float("inf"))
    tl.store(score_ptr + cols, s, mask=ok)
    tl.store(bias_ptr + cols, b.to(bias_ptr.dtype.element_ty), mask=ok)


#: Row slices of the first pass at most: CUDA's limit on a grid's second dimension,
#: which holds them (the default split is a few per SM, far below it).
MAX_SPLIT = 65535


def _choose_split(M: int, N: int, block_m: int, block_n: int, device: torch.device) -> int:
    """Row slices so that (column blocks x slices) is ~4 programs per SM, each with >= 4 tiles."""
    col_blocks = _launch.cdiv(N, block_n)
    target = 4 * _launch.num_sms(device)
    split = min(_launch.cdiv(target, col_blocks), _launch.cdiv(M, 4 * block_m))
    return max(1, split)


def _slices(M: int, N: int, split: int | None, device: torch.device) -> tuple[int, int]:
    """(row slices, rows per slice) of the first pass (whole ``BLOCK_M`` tiles per slice
    when there are several); ``split``: forced (tests), else :func:`_choose_split`. At
    most M, :data:`MAX_SPLIT`, and few enough that ``finish_kernel``'s int32 offsets
    into the workspace (up to ``(split + 2) * N``) cannot overflow."""
    p = configs()[0]["partial"]
    bm = p["BLOCK_M"]
    if split is None:
        split = _choose_split(M, N, bm, p["BLOCK_N"], device)
    split = max(1, min(int(split), M, MAX_SPLIT, (2**31 - 1) // max(N, 1) - 2))
    rows_per_split = _launch.cdiv(M, split)
    if split > 1:
        rows_per_split = _launch.cdiv(rows_per_split, bm) * bm
    return _launch.cdiv(M, rows_per_split), rows_per_split


def _parts(grad: torch.Tensor, split: int, rows_per_split: int, traceable: bool) -> torch.Tensor:
    """The first pass in ``split`` row slices: ``(2, split, N)`` fp32 partial sums."""
    M, N = grad.shape
    p = configs()[0]["partial"]
    work = torch.empty((2, split, N), dtype=torch.float32, device=grad.device)
    _launch.launchable(partial_kernel, traceable)[(_launch.cdiv(N, p["BLOCK_N"]), split)](
        grad, work[0], work[1], M, N, grad.stride(0), grad.stride(1), rows_per_split,
        BLOCK_M=p["BLOCK_M"], BLOCK_N=p["BLOCK_N"], FINAL=False, num_warps=p["num_warps"],
    )
    return work


def column_score_parts(grad: torch.Tensor, *, split: int | None = None, traceable: bool = False) -> torch.Tensor:
    """The first pass of :func:`column_scores_and_bias` alone: ``(2, s, N)`` fp32, row
    slice i's ``sum |G|`` per column in ``[0, i]`` and its ``sum G`` in ``[1, i]``, in
    ``s`` row slices (one or more; ``split`` as there) with NaN and inf as they come.
    ``topk.topk_from_parts`` finishes them and selects in one program. ``grad``: 2-D
    with at least one row, any strides."""
    _launch.check_float_tensor("grad", grad, 2)
    M, N = grad.shape
    if M == 0 or N == 0:
        raise ValueError(f"grad must have rows and columns; got shape {tuple(grad.shape)}")
    s, rows_per_split = _slices(M, N, split, grad.device)
    return _parts(grad, s, rows_per_split, traceable)


def column_scores_and_bias(
    grad: torch.Tensor,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    split: int | None = None,
    traceable: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores, grad_b)`` of a 2-D gradient ``grad: (M, out_features)``.

    ``scores``: fp32 ``sum_m |grad[m, j]|`` with NaN/inf mapped to +inf; ``grad_b``:
    ``grad.sum(0)`` in ``grad``'s dtype, accumulated in fp32. Any strides are accepted.

    ``out``: optional preallocated ``(scores, grad_b)`` buffers (tests pass NaN-filled
    ones). ``split``: force the number of row slices (tests; default: chosen to fill
    the GPU; at most :data:`MAX_SPLIT`, and fewer where the workspace's int32 offsets
    need it: see ``_slices``). ``traceable``: launch through
    ``torch.library.wrap_triton`` (for callers inside a ``triton_op``).
    """
    _launch.check_float_tensor("grad", grad, 2)
    M, N = grad.shape
    device = grad.device
    scores, grad_b = out if out is not None else (None, None)
    scores = _launch.out_or_empty("scores", scores, (N,), torch.float32, device)
    grad_b = _launch.out_or_empty("grad_b", grad_b, (N,), grad.dtype, device)
    if not (scores.is_contiguous() and grad_b.is_contiguous()):
        raise ValueError("out buffers must be contiguous")
    if N == 0:
        return scores, grad_b
    if M == 0:
        scores.zero_()
        grad_b.zero_()
        return scores, grad_b

    cfg = configs()[0]
    pcfg, fcfg = cfg["partial"], cfg["finish"]
    split, rows_per_split = _slices(M, N, split, device)
    if split == 1:
        bm, bn = pcfg["BLOCK_M"], pcfg["BLOCK_N"]
        _launch.launchable(partial_kernel, traceable)[(_launch.cdiv(N, bn), 1)](
            grad, scores, grad_b, M, N, grad.stride(0), grad.stride(1), rows_per_split,
            BLOCK_M=bm, BLOCK_N=bn, FINAL=True, num_warps=pcfg["num_warps"],
        )
        return scores, grad_b

    work = _parts(grad, split, rows_per_split, traceable)
    fbn = fcfg["BLOCK_N"]
    _launch.launchable(finish_kernel, traceable)[(_launch.cdiv(N, fbn),)](
        work[0], work[1], scores, grad_b, N, split,
        BLOCK_N=fbn, num_warps=fcfg["num_warps"],
    )
    return scores, grad_b
