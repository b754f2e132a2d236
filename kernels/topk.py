"""Deterministic top-k of fp32 scores: indices sorted ascending, ties to the lower index.

Equal to ``reference.select_topk`` bit for bit, for any ``k`` in ``[1, n]``.

How: each score becomes a uint32 key whose unsigned order is the float order (NaN counts
as +inf, -0 as +0). A radix search fixes the k-th largest key ``T`` four bits at a time,
from the top: in each of 8 rounds the 16 candidates ``T | d << shift`` are counted at once
(``count(key >= candidate)``) and the largest digit whose count is still ``>= k`` is kept.
Then ``need_eq = k - count(key > T)`` and one pass in index order writes every index with
``key > T`` and the first ``need_eq`` indices with ``key == T`` (lower indices win ties),
their positions given by prefix sums (``tl.cumsum``), so the output comes out sorted.
The same pass writes the complement (the ``n - k`` unselected indices, ascending), which
the weight-gradient kernel uses to zero the other rows.

One program does it all (no atomics, nothing order-dependent), reading the scores
``8 + 2`` times in blocks of ``BLOCK``: ``n = 4096`` is 4 blocks, ``n = 65536`` 64 blocks.
Any ``n < 2**31`` works.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch

__all__ = ["topk_indices", "configs", "topk_kernel"]


def configs() -> list[dict]:
    """The launch configs this file ships (one)."""
    return [{"BLOCK": 1024, "RADIX_BITS": 4, "num_warps": 8}]


@triton.jit
def _sort_key(x):
    """uint32 key of an fp32 score: unsigned key order == float order; NaN -> +inf, -0 -> +0."""
    x = tl.where(x != x, float("inf"), x)
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.uint32, bitcast=True)
    neg = (bits >> 31) != 0
    return tl.where(neg, ~bits, bits | 0x80000000)


@triton.jit
def topk_kernel(
    s_ptr, idx_ptr, rest_ptr,
    N, K, stride_s,
    BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr, WRITE_REST: tl.constexpr,
):
    RADIX: tl.constexpr = 1 << RADIX_BITS
    ROUNDS: tl.constexpr = 32 // RADIX_BITS
    offs = tl.arange(0, BLOCK)
    digits = tl.arange(0, RADIX).to(tl.uint32)

    # Radix search for T, the k-th largest key. Invariant: count(key >= T) >= K.
    thresh = tl.full([], 0, dtype=tl.uint32)
    for r in tl.static_range(ROUNDS):
        shift: tl.constexpr = 32 - (r + 1) * RADIX_BITS
        cand = thresh | (digits << shift)  # [RADIX], increasing
        counts = tl.zeros([RADIX], dtype=tl.int32)
        for c0 in range(0, N, BLOCK):
            i = c0 + offs
            ok = i < N
            key = _sort_key(tl.load(s_ptr + i.to(tl.int64) * stride_s, mask=ok, other=0.0))
            ge = (key[None, :] >= cand[:, None]) & ok[None, :]
            counts += tl.sum(ge.to(tl.int32), axis=1)
        # counts is non-increasing in the digit and counts[0] >= K: keep the largest
        # digit whose count still reaches K.
        digit = tl.sum((counts >= K).to(tl.int32), axis=0) - 1
        thresh = thresh | (digit.to(tl.uint32) << shift)

    n_gt = tl.full([], 0, dtype=tl.int32)
    for c0 in range(0, N, BLOCK):
        i = c0 + offs
        ok = i < N
        key = _sort_key(tl.load(s_ptr + i.to(tl.int64) * stride_s, mask=ok, other=0.0))
        n_gt += tl.sum(((key > thresh) & ok).to(tl.int32), axis=0)
    need_eq = K - n_gt  # >= 1: how many of the keys equal to T are taken, lowest index first

    # Compaction in index order: prefix sums give each kept index its output slot.
    n_sel = tl.full([], 0, dtype=tl.int32)
    n_eq = tl.full([], 0, dtype=tl.int32)
    for c0 in range(0, N, BLOCK):
        i = c0 + offs
        ok = i < N
        key = _sort_key(tl.load(s_ptr + i.to(tl.int64) * stride_s, mask=ok, other=0.0))
        eq = ((key == thresh) & ok).to(tl.int32)
        eq_rank = n_eq + tl.cumsum(eq, axis=0) - eq  # keys == T before i
        sel = (((key > thresh) & ok) | ((eq != 0) & (eq_rank < need_eq))).to(tl.int32)
        pos = n_sel + tl.cumsum(sel, axis=0) - sel  # kept indices before i
        i64 = i.to(tl.int64)
        tl.store(idx_ptr + pos, i64, mask=sel != 0)
        if WRITE_REST:
            tl.store(rest_ptr + (i - pos), i64, mask=ok & (sel == 0))
        n_sel += tl.sum(sel, axis=0)
        n_eq += tl.sum(eq, axis=0)


def topk_indices(
    scores: torch.Tensor,
    k: int,
    *,
    return_rest: bool = False,
    out: torch.Tensor | None = None,
    rest_out: torch.Tensor | None = None,
):
    """Indices of the ``k`` largest ``scores`` (1-D fp32), ascending; ties to the lower index.

    Equal to ``reference.select_topk(scores, k)``; NaN counts as +inf. With
    ``return_rest=True`` returns ``(idx, rest)``, ``rest`` the other ``n - k`` indices
    ascending. ``out`` / ``rest_out``: optional preallocated int64 buffers.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1 or scores.dtype != torch.float32:
        raise TypeError("scores must be a 1-D float32 tensor")
    if scores.device.type != "cuda" and not _launch.interpreter_enabled():
        raise RuntimeError(
            f"the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1; scores are on '{scores.device}'"
        )
    n = scores.shape[0]
    k = int(k)
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in [1, {n}] for {n} scores; got {k}")
    device = scores.device
    if out is None:
        out = torch.empty(k, dtype=torch.int64, device=device)
    else:
        _launch.check_out("out", out, (k,), torch.int64, device)
    if return_rest:
        if rest_out is None:
            rest_out = torch.empty(n - k, dtype=torch.int64, device=device)
        else:
            _launch.check_out("rest_out", rest_out, (n - k,), torch.int64, device)
    if not out.is_contiguous() or (return_rest and not rest_out.is_contiguous()):
        raise ValueError("out buffers must be contiguous")

    cfg = configs()[0]
    topk_kernel[(1,)](
        scores, out, rest_out if return_rest else out,
        n, k, scores.stride(0),
        BLOCK=cfg["BLOCK"], RADIX_BITS=cfg["RADIX_BITS"], WRITE_REST=return_rest,
        num_warps=cfg["num_warps"],
    )
    return (out, rest_out) if return_rest else out
