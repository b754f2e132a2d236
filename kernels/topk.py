"""Deterministic top-k of fp32 scores: indices sorted ascending, ties to the lower index.

Equal to ``reference.select_topk`` bit for bit, for any ``k`` in ``[1, n]``.

How: each score becomes a uint32 key whose unsigned order is the float order (NaN counts
as +inf, -0 as +0). The k-th largest key ``T`` is found first, with ``count(key > T)``,
so ``need_eq = k - count(key > T)``. One last pass in index order writes every index
with ``key > T`` and the first ``need_eq`` indices with ``key == T`` (lower indices win
ties), each at the slot given by a prefix sum (:func:`compact_chunk`), so the output
comes out sorted. The same pass writes the complement (the ``n - k`` unselected
indices, ascending).

Up to ``n = MAX_RESIDENT = 16384`` one program does it all (``topk_kernel``, no atomics,
nothing order-dependent): the scores are read once, into registers (16 keys per thread
of 8, 16 or 32 warps), and ``T`` is found there one bit at a time from the top by
counting (:func:`_resident_threshold`: a compare and a count per key and one reduction
a round, starting below the high bits that the smallest and largest key share); the
compaction then reads the scores again in chunks (:func:`configs`). The same kernel can
also stream blocks of ``BLOCK`` for any ``n`` (a config kept for tests and comparison):
a radix select that fixes ``T`` eight bits at a time, each of its 4 rounds a pass that
builds a 256-bin histogram (``tl.histogram``) of the next digit of the keys that share
T's digits so far, then the compaction pass (5 reads: ``n = 65536`` is 64 blocks a
pass). It takes ``n`` up to ``2**31 - BLOCK`` (its loop counters are 32-bit).

The backward's scores come from ``scores.column_score_parts`` as fp32 partial sums over
row slices (one slice per group of SMs, to read G at full bandwidth). Up to
``MAX_FROM_PARTS = 4096`` the resident program adds them up itself (``topk_from_parts``,
``FROM_PARTS``): slice by slice in index order from zero in fp32, exactly as
``scores.finish_kernel`` would, and writes the bias gradient beside. That saves a
launch and a pass over the scores, and gives the same bits.

While that one program selects, the rest of the GPU is idle. ``zero=`` (of
:func:`topk_indices` and :func:`topk_from_parts`) puts more programs in the same launch
to fill a tensor with zeros there: the
unified backward's cuBLAS route has them write ``grad_W``'s zeros (its k rows are copied
in afterwards), so that pass costs neither a launch nor time of its own.

Above ``MAX_RESIDENT`` one program would stream the five dependent passes alone, on one
SM (at n = 65,536: 320 dependent block loads). There the selection is spread over
``P = cdiv(n, BLOCK)`` programs instead (:func:`pick_config` chooses it for every
``n > MAX_RESIDENT``), the streaming radix select in five launches:

* ``radix_histogram_kernel``, once per digit round r = 0..3: each program reads its
  slice of ``BLOCK`` keys, finds T's digits of the earlier rounds itself from the global
  histograms of those rounds (every program does the same integer arithmetic on the same
  counts, so all agree: no host sync, nothing data-dependent on the host), histograms
  round r's digit of its keys that share them, and adds that into the global histogram
  of round r with int32 atomic adds (integer addition: the order does not matter, the
  counts are exact). The last round also stores the program's own counts, cumulated from
  the top digit down and offset by its keys above T's first three digits (``ge[d]``:
  keys >= the key with last digit d, per program), for the last pass.
* ``radix_write_kernel``: each program finds T and ``need_eq`` the same way, gets
  ``count(key > T)`` and ``count(key == T)`` of every earlier program from two entries of
  its ``ge`` row (``ge[d + 1]`` and ``ge[d] - ge[d + 1]``) and sums them in index order
  (an exclusive scan), then compacts its slice exactly as the single program does. So
  the selected set, the ascending output order, the tie rule and ``rest`` are the single
  program's, bit for bit.

Workspace per call: ``4 * 256 + P * 257`` int32 (P = 64 at n = 65,536: 66 KiB), zeroed
by one fill; nothing is read back by the host, so the launches can be captured in a
CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from .scores import add_slices

#: ``tl.sum`` / ``tl.cumsum`` are ``tl.reduce`` / ``tl.associative_scan`` with this combine
#: function (after widening integers narrower than 32 bits, which never occur here). The
#: kernels call those two builtins with it directly: the same code on a GPU, but under
#: Triton's interpreter every call of a ``@triton.jit`` helper (``tl.sum`` included)
#: re-patches ``triton.language`` first, ~1 ms each, which dominated the interpreter
#: tests.
_sum_combine = tl.standard._sum_combine

__all__ = [
    "topk_indices", "topk_from_parts", "configs", "pick_config", "topk_kernel", "radix_histogram_kernel", "radix_write_kernel",
    "MAX_RESIDENT", "MAX_FROM_PARTS", "compact_chunk",
]


#: The largest ``n`` whose keys one program holds in registers without spilling.
MAX_RESIDENT = 16384
#: The largest ``n`` whose scores' row slices that program adds up itself
#: (:func:`topk_from_parts`): it holds their sums and the bias sums too.
MAX_FROM_PARTS = 4096


def configs() -> list[dict]:
    """The launch configs this file ships: streaming blocks in one program (any n), keys
    resident in registers for n up to 4096, 8192 and :data:`MAX_RESIDENT`, and the
    multi-program radix select (``MULTI``: one program per ``BLOCK`` keys, any n); see
    :func:`pick_config`. ``CHUNK``: the compaction's step: the scores are read again,
    ``CHUNK`` at a time (from L1 / L2: they were just read). Compacting a whole block
    from the registers (the int64 index stores of a block, converted through shared
    memory) spilled: at 8192 keys on 16 warps, and at 4096 on 8 warps under triton 3.6.
    :func:`topk_from_parts`, whose scores are only in registers, compacts them there,
    4096 at once. 16 keys a thread in every resident config, 8, 4 or 2 a chunk: each
    chunk's prefix sum across the warps costs about ten barriers (sm_90 SASS), so the
    chunks are as large as compile without spills under every supported triton (16,384
    keys in chunks of 4096 spilled, in the sm_90 build for strided scores; 8,192 in
    chunks of 4096 under triton 3.8, whose ptxas held that build to 64 registers)."""
    return [
        {"BLOCK": 1024, "CHUNK": 1024, "RADIX_BITS": 8, "num_warps": 8, "RESIDENT": False, "MULTI": False},
        {"BLOCK": MAX_FROM_PARTS, "CHUNK": 2048, "RADIX_BITS": 8, "num_warps": 8, "RESIDENT": True, "MULTI": False},
        {"BLOCK": 8192, "CHUNK": 2048, "RADIX_BITS": 8, "num_warps": 16, "RESIDENT": True, "MULTI": False},
        {"BLOCK": MAX_RESIDENT, "CHUNK": 2048, "RADIX_BITS": 8, "num_warps": 32, "RESIDENT": True, "MULTI": False},
        {"BLOCK": 1024, "CHUNK": 1024, "RADIX_BITS": 8, "num_warps": 4, "RESIDENT": False, "MULTI": True},
    ]


def pick_config(n: int) -> dict:
    """The rule: one program with its keys resident in registers when they fit, the
    smallest such config (n <= :data:`MAX_RESIDENT`; masked lanes of a smaller n cost
    nothing but registers), else the multi-program radix select (n > MAX_RESIDENT: one
    program of 1024 keys per slice, 17 programs at n = 16,385, 64 at 65,536). The
    streaming single-program config, and the multi-program one at any n, stay available
    through ``config=``."""
    cfgs = configs()
    for c in cfgs:
        if c["RESIDENT"] and n <= c["BLOCK"]:
            return c
    return next(c for c in cfgs if c["MULTI"])


def _from_parts_config() -> dict:
    return next(c for c in configs() if c["RESIDENT"] and c["BLOCK"] == MAX_FROM_PARTS)


@triton.jit
def _sort_key(x):
    """uint32 key of an fp32 score: unsigned key order == float order; NaN -> +inf, -0 -> +0."""
    x = tl.where(x != x, float("inf"), x)
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.uint32, bitcast=True)
    neg = (bits >> 31) != 0
    # ``bits ^ 0xFFFFFFFF`` rather than ``~bits``: the same instruction, but the
    # interpreter of triton 3.6-3.8 builds ``~`` of an unsigned tensor from
    # ``np.full(1, -1, dtype=uint32)``, which numpy 2 refuses (OverflowError).
    return tl.where(neg, bits ^ 0xFFFFFFFF, bits | 0x80000000)


@triton.jit
def _keys(s_ptr, i, N, stride_s):
    """Sort keys of the scores at indices ``i`` (lanes at or past N masked)."""
    return _sort_key(tl.load(s_ptr + i.to(tl.int64) * stride_s, mask=i < N, other=0.0))


@triton.jit
def topk_kernel(
    s_ptr, idx_ptr, rest_ptr, bias_ptr, zero_ptr,
    N, K, stride_s, SPLIT, ZERO_N,
    BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr, WRITE_REST: tl.constexpr, RESIDENT: tl.constexpr,
    CHUNK: tl.constexpr, FROM_PARTS: tl.constexpr = False, ZERO_BLOCK: tl.constexpr = 0,
):
    """``RESIDENT``: ``N <= BLOCK``, every key loaded once and kept in registers;
    otherwise each pass streams the scores in blocks of ``BLOCK``. The compaction takes
    ``CHUNK`` keys a step: from the registers when ``CHUNK == BLOCK``, else read again.

    ``FROM_PARTS`` (with ``RESIDENT``): ``s_ptr`` is the ``(2, SPLIT, N)`` fp32 partial
    sums of ``scores.column_score_parts`` (``[0]``: each row slice's sum of ``|G|``,
    ``[1]``: its sum of G). The program finishes them as ``scores.finish_kernel`` does
    (the slices added in index order from zero, in fp32), writes the bias sums to
    ``bias_ptr`` in its dtype, and selects from the finished scores it holds: one launch
    and one pass over the scores fewer. Otherwise ``bias_ptr`` and ``SPLIT`` are unused.

    ``ZERO_BLOCK > 0``: program 0 selects, and programs 1, 2, ... write zeros into the
    ``ZERO_N`` contiguous elements at ``zero_ptr`` (``ZERO_BLOCK`` at a time, each
    program every ``num_programs - 1``-th block), on the SMs that the one selecting
    program leaves idle (the cuBLAS route's ``grad_W``, whose k rows are copied in
    afterwards). Otherwise ``zero_ptr`` and ``ZERO_N`` are unused.
    """
    if ZERO_BLOCK == 0:
        _select(s_ptr, idx_ptr, rest_ptr, bias_ptr, N, K, stride_s, SPLIT,
                BLOCK, RADIX_BITS, WRITE_REST, RESIDENT, CHUNK, FROM_PARTS)
    else:
        pid = tl.program_id(0)
        if pid == 0:
            _select(s_ptr, idx_ptr, rest_ptr, bias_ptr, N, K, stride_s, SPLIT,
                    BLOCK, RADIX_BITS, WRITE_REST, RESIDENT, CHUNK, FROM_PARTS)
        else:
            step = (tl.num_programs(0) - 1).to(tl.int64) * ZERO_BLOCK
            offs = (pid - 1).to(tl.int64) * ZERO_BLOCK + tl.arange(0, ZERO_BLOCK)
            zero = tl.zeros([ZERO_BLOCK], dtype=zero_ptr.dtype.element_ty)
            for _ in range(0, tl.cdiv(ZERO_N, step)):
                tl.store(zero_ptr + offs, zero, mask=offs < ZERO_N)
                offs += step


@triton.jit
def _select(
    s_ptr, idx_ptr, rest_ptr, bias_ptr, N, K, stride_s, SPLIT,
    BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr, WRITE_REST: tl.constexpr, RESIDENT: tl.constexpr,
    CHUNK: tl.constexpr, FROM_PARTS: tl.constexpr,
):
    """The selection of :func:`topk_kernel` (one program)."""
    BINS: tl.constexpr = 1 << RADIX_BITS
    ROUNDS: tl.constexpr = 32 // RADIX_BITS
    tl.static_assert(32 % RADIX_BITS == 0)
    tl.static_assert(CHUNK <= 16384)  # the packed prefix sum of compact_chunk must not overflow
    tl.static_assert(CHUNK == BLOCK or (RESIDENT and not FROM_PARTS))  # re-read: the scores are in memory
    tl.static_assert(RESIDENT or not FROM_PARTS)
    offs = tl.arange(0, BLOCK)
    bins = tl.arange(0, BINS)
    if RESIDENT:
        if FROM_PARTS:
            in_n = offs < N
            score_sum = tl.zeros([BLOCK], dtype=tl.float32)
            bias_sum = tl.zeros([BLOCK], dtype=tl.float32)
            # int32 offsets: topk_from_parts checks 2 * SPLIT * N < 2**31. Four slices a
            # step, in index order: the sums finish_kernel makes, bit for bit.
            for sl in range(0, SPLIT, 4):
                score_sum, bias_sum = add_slices(
                    score_sum, bias_sum, s_ptr + offs, s_ptr + SPLIT * N + offs, sl, SPLIT, N, offs, in_n
                )
            tl.store(bias_ptr + offs, bias_sum.to(bias_ptr.dtype.element_ty), mask=in_n)
            resident = _sort_key(score_sum)  # NaN -> +inf, as the finished scores have it
        else:
            resident = _keys(s_ptr, offs, N, stride_s)
        thresh, n_above = _resident_threshold(resident, offs < N, K)
    else:
        # Radix select of T, the k-th largest key, RADIX_BITS at a time from the top,
        # each round a pass over the scores. Invariant: n_above keys lie above the keys
        # that share T's fixed high digits, and n_above + count(keys sharing them) >= K.
        thresh = tl.full([], 0, dtype=tl.uint32)
        n_above = tl.full([], 0, dtype=tl.int32)
        for r in tl.static_range(ROUNDS):
            shift = 32 - (r + 1) * RADIX_BITS  # a constexpr: r comes from static_range
            hist = tl.zeros([BINS], dtype=tl.int32)
            for c0 in range(0, N, BLOCK):
                i = c0 + offs
                key = _keys(s_ptr, i, N, stride_s)
                ok = i < N
                if r > 0:
                    ok = ok & ((key >> (shift + RADIX_BITS)) == (thresh >> (shift + RADIX_BITS)))
                key_digit = ((key >> shift) & (BINS - 1)).to(tl.int32)
                hist += tl.histogram(key_digit, BINS, mask=ok)
            # at_least[d]: keys with this round's digit >= d; keep the largest digit that
            # still leaves K keys at or above it.
            at_least = n_above + tl.cumsum(hist, axis=0, reverse=True)
            digit = tl.sum((at_least >= K).to(tl.int32), axis=0) - 1
            n_above += tl.sum(tl.where(bins > digit, hist, 0), axis=0)
            thresh = thresh | (digit.to(tl.uint32) << shift)
    # Now n_above = count(key > T) and need_eq = K - n_above >= 1 keys equal to T are
    # taken, lowest index first: the compaction, in index order.
    need_eq = K - n_above
    n_gt = tl.full([], 0, dtype=tl.int32)
    n_eq = tl.full([], 0, dtype=tl.int32)
    c_offs = tl.arange(0, CHUNK)
    for c0 in range(0, N, CHUNK):
        i = c0 + c_offs
        ok = i < N
        if RESIDENT and CHUNK == BLOCK:
            key = resident
        else:
            key = _keys(s_ptr, i, N, stride_s)
        sel, pos, n_gt, n_eq = compact_chunk(key > thresh, key == thresh, ok, n_gt, n_eq, need_eq)
        i64 = i.to(tl.int64)
        tl.store(idx_ptr + pos, i64, mask=sel)
        if WRITE_REST:
            tl.store(rest_ptr + (i - pos), i64, mask=ok & ~sel)


@triton.jit
def _resident_threshold(keys, valid, K):
    """``(T, count(key > T))``: T the K-th largest of the uint32 ``keys`` whose ``valid``
    is set (``1 <= K <= count(valid)``), all held in registers.

    T is found one bit at a time from the top, by counting: T keeps a bit when at least
    K keys are at or above it with that bit set. Each round is a compare and a count per
    key and one reduction: integer work only, no histogram. (The 256-bin histograms of
    a radix select are shared-memory atomics, and the scores' keys pile into a handful
    of bins -- their sign and exponent bits are mostly the same -- so those atomics
    serialize on one address.) T lies between the smallest and the largest key, so it
    has their common high bits: the search starts below them, at the highest bit where
    the two differ (every key equal: no round). A loop, not unrolled (see
    ``per_example.row_select_kernel``: torch.compile's analysis of unrolled rounds).
    """
    keys = tl.where(valid, keys, 0)  # 0 lies below every real key (-inf's is 0x007FFFFF) and every candidate
    hi = tl.max(keys, axis=0)
    lo = tl.min(tl.where(valid, keys, 0xFFFFFFFF), axis=0)
    low = hi ^ lo  # smeared down: every bit at or below the highest one where hi and lo differ
    low = low | (low >> 1)
    low = low | (low >> 2)
    low = low | (low >> 4)
    low = low | (low >> 8)
    low = low | (low >> 16)
    thresh = hi & (low ^ 0xFFFFFFFF)
    bit = low ^ (low >> 1)
    while bit != 0:
        cand = thresh | bit
        n_ge = tl.reduce((keys >= cand).to(tl.int32), 0, _sum_combine)
        thresh = tl.where(n_ge >= K, cand, thresh)
        bit = bit >> 1
    return thresh, tl.reduce((keys > thresh).to(tl.int32), 0, _sum_combine)


@triton.jit
def compact_chunk(gt, eq, ok, n_gt, n_eq, need_eq):
    """Where one chunk of keys, in index order, goes in the selection's output.

    ``gt`` / ``eq``: each key's ``key > T`` / ``key == T``, ``ok``: the lanes in range
    (at most 16,384 lanes: the packed prefix sum below must not carry between halves);
    ``n_gt`` / ``n_eq``: the counts of keys > T / == T in the earlier chunks;
    ``need_eq``: how many keys == T are taken, lower indices first. Returns ``(sel,
    pos, n_gt, n_eq)``: which keys are selected, each one's slot in the ascending
    output (for the others, ``i - pos`` is their slot among the unselected), and the
    counts after this chunk. One prefix sum of ``(gt << 16) | eq`` gives both counts
    before each key: the kept indices before it are the keys > T plus
    ``min(keys == T, need_eq)``. Shared by every selection kernel here and in
    :mod:`.per_example`.
    """
    gt = (gt & ok).to(tl.int32)
    eq = (eq & ok).to(tl.int32)
    packed = (gt << 16) | eq
    before = tl.associative_scan(packed, 0, _sum_combine) - packed
    eq_before = n_eq + (before & 0xFFFF)
    pos = n_gt + (before >> 16) + tl.minimum(eq_before, need_eq)
    sel = (gt != 0) | ((eq != 0) & (eq_before < need_eq))
    total = tl.reduce(packed, 0, _sum_combine)
    return sel, pos, n_gt + (total >> 16), n_eq + (total & 0xFFFF)


# --- the multi-program radix select (n > MAX_RESIDENT) -----------------------------------


@triton.jit
def _digits_so_far(hist_ptr, K, ROUNDS: tl.constexpr, RADIX_BITS: tl.constexpr):
    """T's digits of the first ``ROUNDS`` rounds from their global histograms (rows of
    ``2**RADIX_BITS`` int32 at ``hist_ptr``), and ``n_above``: the keys above every key
    that shares those digits. The single program's arithmetic, repeated by each program."""
    BINS: tl.constexpr = 1 << RADIX_BITS
    bins = tl.arange(0, BINS)
    thresh = tl.full([], 0, dtype=tl.uint32)
    n_above = tl.full([], 0, dtype=tl.int32)
    for r in tl.static_range(ROUNDS):
        shift = 32 - (r + 1) * RADIX_BITS
        hist = tl.load(hist_ptr + r * BINS + bins)
        at_least = n_above + tl.cumsum(hist, axis=0, reverse=True)
        digit = tl.sum((at_least >= K).to(tl.int32), axis=0) - 1
        n_above += tl.sum(tl.where(bins > digit, hist, 0), axis=0)
        thresh = thresh | (digit.to(tl.uint32) << shift)
    return thresh, n_above


@triton.jit
def radix_histogram_kernel(
    s_ptr, hist_ptr, ge_ptr,
    N, K, stride_s,
    ROUND: tl.constexpr, BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr,
):
    """Round ``ROUND`` of the radix select, program p on keys ``[p*BLOCK, (p+1)*BLOCK)``:
    adds the histogram of this round's digit (keys that share T's earlier digits) into
    row ``ROUND`` of ``hist_ptr``. The last round also writes the program's row of
    ``ge_ptr`` (``BINS + 1`` int32): ``ge[d]`` = its keys that share T's earlier digits
    with a last digit >= d, plus its keys above them; ``ge[BINS]`` = those above."""
    BINS: tl.constexpr = 1 << RADIX_BITS
    ROUNDS: tl.constexpr = 32 // RADIX_BITS
    shift: tl.constexpr = 32 - (ROUND + 1) * RADIX_BITS
    tl.static_assert(32 % RADIX_BITS == 0)
    pid = tl.program_id(0)
    i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N
    key = _keys(s_ptr, i, N, stride_s)
    bins = tl.arange(0, BINS)
    if ROUND > 0:
        thresh, n_above = _digits_so_far(hist_ptr, K, ROUND, RADIX_BITS)
        high = shift + RADIX_BITS
        match = ok & ((key >> high) == (thresh >> high))
    else:
        match = ok
    key_digit = ((key >> shift) & (BINS - 1)).to(tl.int32)
    hist = tl.histogram(key_digit, BINS, mask=match)
    tl.atomic_add(hist_ptr + ROUND * BINS + bins, hist, sem="relaxed")
    if ROUND == ROUNDS - 1:
        above = tl.sum((ok & ((key >> RADIX_BITS) > (thresh >> RADIX_BITS))).to(tl.int32), axis=0)
        row = ge_ptr + pid.to(tl.int64) * (BINS + 1)
        tl.store(row + bins, above + tl.cumsum(hist, axis=0, reverse=True))
        tl.store(row + BINS, above)


@triton.jit
def radix_write_kernel(
    s_ptr, hist_ptr, ge_ptr, idx_ptr, rest_ptr,
    N, K, stride_s,
    BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr, SCAN_BLOCK: tl.constexpr, WRITE_REST: tl.constexpr,
):
    """The last pass, program p: T from the histograms, the counts of keys > T and == T
    in programs 0..p-1 (an exclusive scan over their ``ge`` rows, in index order), then
    the single program's compaction of keys ``[p*BLOCK, (p+1)*BLOCK)``."""
    BINS: tl.constexpr = 1 << RADIX_BITS
    ROUNDS: tl.constexpr = 32 // RADIX_BITS
    tl.static_assert(BLOCK <= 16384)  # the packed prefix sum of compact_chunk must not overflow
    pid = tl.program_id(0)
    i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N
    key = _keys(s_ptr, i, N, stride_s)
    thresh, n_above = _digits_so_far(hist_ptr, K, ROUNDS, RADIX_BITS)
    need_eq = K - n_above
    d = (thresh & (BINS - 1)).to(tl.int32)

    # ge[q, d + 1] = count(key > T) in program q, ge[q, d] - ge[q, d + 1] = count(key == T).
    acc_gt = tl.zeros([SCAN_BLOCK], dtype=tl.int32)
    acc_ge = tl.zeros([SCAN_BLOCK], dtype=tl.int32)
    for q0 in range(0, pid, SCAN_BLOCK):
        q = q0 + tl.arange(0, SCAN_BLOCK)
        row = ge_ptr + q.to(tl.int64) * (BINS + 1)
        before = q < pid
        acc_ge += tl.load(row + d, mask=before, other=0)
        acc_gt += tl.load(row + d + 1, mask=before, other=0)
    n_gt = tl.sum(acc_gt, axis=0)
    n_eq = tl.sum(acc_ge, axis=0) - n_gt

    # The compaction of topk_kernel, offset by the earlier programs' counts.
    sel, pos, n_gt, n_eq = compact_chunk(key > thresh, key == thresh, ok, n_gt, n_eq, need_eq)
    tl.store(idx_ptr + pos, i, mask=sel)
    if WRITE_REST:
        tl.store(rest_ptr + (i - pos), i, mask=ok & ~sel)


def _multi_program_topk(scores, n, k, out, rest_out, return_rest, cfg, traceable):
    """The five launches of the multi-program radix select (see the module docstring)."""
    block, bits = cfg["BLOCK"], cfg["RADIX_BITS"]
    bins, rounds = 1 << bits, 32 // bits
    programs = _launch.cdiv(n, block)
    work = torch.zeros(rounds * bins + programs * (bins + 1), dtype=torch.int32, device=scores.device)
    hist, ge = work[: rounds * bins], work[rounds * bins :]
    for r in range(rounds):
        _launch.launchable(radix_histogram_kernel, traceable)[(programs,)](
            scores, hist, ge, n, k, scores.stride(0),
            ROUND=r, BLOCK=block, RADIX_BITS=bits, num_warps=cfg["num_warps"],
        )
    _launch.launchable(radix_write_kernel, traceable)[(programs,)](
        scores, hist, ge, out, rest_out if return_rest else out, n, k, scores.stride(0),
        BLOCK=block, RADIX_BITS=bits, SCAN_BLOCK=SCAN_BLOCK, WRITE_REST=return_rest, num_warps=cfg["num_warps"],
    )


#: Earlier programs' count rows read at once by each program of ``radix_write_kernel``.
SCAN_BLOCK = 128

#: ``zero=`` of :func:`topk_indices` / :func:`topk_from_parts`: elements each
#: zero-filling program writes a step (16 a thread of 8 warps, 4 of 32), and how many
#: such programs per SM, at most. The selecting program's registers leave room for one
#: program per SM, so two waves.
ZERO_BLOCK = 4096
ZERO_PROGRAMS_PER_SM = 2


def _k_and_outputs(n, k, return_rest, out, rest_out, device):
    """``k`` checked against ``n`` scores, and the index buffers (given ones checked)."""
    k = int(k)
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in [1, {n}] for {n} scores; got {k}")
    out = _launch.out_or_empty("out", out, (k,), torch.int64, device)
    if return_rest:
        rest_out = _launch.out_or_empty("rest_out", rest_out, (n - k,), torch.int64, device)
    if not out.is_contiguous() or (return_rest and not rest_out.is_contiguous()):
        raise ValueError("out buffers must be contiguous")
    return k, out, rest_out


def _zero_programs(zero, device, traceable, *others) -> int:
    """How many programs fill ``zero`` beside the selecting one (0 without it), checked:
    a contiguous float tensor on ``device`` that shares no memory with the tensors in
    ``others`` (the selection's inputs and outputs: its other programs would zero what
    the selecting one reads or writes; not checked when ``traceable``, where the tensors
    may be fake, as ``per_example.row_topk_indices`` does for ``masked``)."""
    if zero is None:
        return 0
    if not isinstance(zero, torch.Tensor):
        raise TypeError(f"zero must be a tensor; got {type(zero).__name__}")
    _launch.check_float_tensor("zero", zero, zero.dim())
    if zero.device != device:
        raise ValueError(f"zero must be on '{device}'; got a tensor on '{zero.device}'")
    if not zero.is_contiguous():
        raise ValueError(f"zero must be a contiguous tensor; got strides {zero.stride()} for shape {tuple(zero.shape)}")
    if not traceable and zero.numel() and any(
        t is not None and t.numel() and t.untyped_storage().data_ptr() == zero.untyped_storage().data_ptr()
        for t in others
    ):
        raise ValueError("zero must not share memory with the scores or the index buffers")
    most = ZERO_PROGRAMS_PER_SM * _launch.num_sms(device)
    return min(_launch.cdiv(zero.numel(), ZERO_BLOCK), most)


def topk_indices(
    scores: torch.Tensor,
    k: int,
    *,
    return_rest: bool = False,
    out: torch.Tensor | None = None,
    rest_out: torch.Tensor | None = None,
    config: dict | None = None,
    traceable: bool = False,
    zero: torch.Tensor | None = None,
):
    """Indices of the ``k`` largest ``scores`` (1-D fp32), ascending; ties to the lower index.

    Equal to ``reference.select_topk(scores, k)``; NaN counts as +inf. With
    ``return_rest=True`` returns ``(idx, rest)``, ``rest`` the other ``n - k`` indices
    ascending. ``out`` / ``rest_out``: optional preallocated int64 buffers; ``config``:
    one of :func:`configs` (default :func:`pick_config`).
    ``traceable``: launch through ``torch.library.wrap_triton`` (inside a ``triton_op``).
    ``zero``: a contiguous tensor of any float dtype filled with zeros on the way, as
    :func:`topk_from_parts` does, by programs beside the one that selects (the
    multi-program config: by ``zero_()``).
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1 or scores.dtype != torch.float32:
        raise TypeError("scores must be a 1-D float32 tensor")
    if not scores.is_cuda and not _launch.interpreter_enabled():
        raise RuntimeError(
            f"the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1; scores are on '{scores.device}'"
        )
    n = scores.shape[0]
    if config is None:
        cfg = pick_config(n)
    elif config in configs():
        cfg = config
    else:
        raise ValueError(f"config must be one of topk.configs(); got {config!r}")
    if cfg["RESIDENT"] and n > cfg["BLOCK"]:
        raise ValueError(f"config {cfg} holds {cfg['BLOCK']} keys in registers; n = {n}")
    step = max(cfg["BLOCK"], cfg["CHUNK"])
    if not (cfg["RESIDENT"] or cfg["MULTI"]) and n > 2**31 - step:
        # its 32-bit loop counter would wrap past 2**31 on the last block
        raise ValueError(
            f"config {cfg} streams its blocks in one program, with 32-bit counters: it takes "
            f"n up to 2**31 - {step}; got n = {n} (the default config takes any n)"
        )
    k, out, rest_out = _k_and_outputs(n, k, return_rest, out, rest_out, scores.device)
    zero_programs = _zero_programs(zero, scores.device, traceable, scores, out, rest_out)

    if cfg["MULTI"]:
        _multi_program_topk(scores, n, k, out, rest_out, return_rest, cfg, traceable)
        if zero is not None:
            zero.zero_()
        return (out, rest_out) if return_rest else out
    _launch.launchable(topk_kernel, traceable)[(1 + zero_programs,)](
        scores, out, rest_out if return_rest else out, scores, zero if zero_programs else scores,
        n, k, scores.stride(0), 1, zero.numel() if zero_programs else 0,
        BLOCK=cfg["BLOCK"], RADIX_BITS=cfg["RADIX_BITS"], WRITE_REST=return_rest, RESIDENT=cfg["RESIDENT"],
        CHUNK=cfg["CHUNK"], FROM_PARTS=False,  # defaults too: torch.compile's analysis of the launch takes none
        ZERO_BLOCK=ZERO_BLOCK if zero_programs else 0, num_warps=cfg["num_warps"],
    )
    return (out, rest_out) if return_rest else out


def topk_from_parts(
    parts: torch.Tensor,
    k: int,
    bias: torch.Tensor,
    *,
    return_rest: bool = False,
    out: torch.Tensor | None = None,
    rest_out: torch.Tensor | None = None,
    traceable: bool = False,
    zero: torch.Tensor | None = None,
):
    """:func:`topk_indices` of the column scores that ``parts`` sum to, and their bias
    sums written to ``bias``, in one program (``n <= MAX_FROM_PARTS``).

    ``parts``: the ``(2, split, n)`` contiguous fp32 partial sums of
    ``scores.column_score_parts`` (``[0]``: the row slices' sums of ``|G|``, ``[1]``:
    their sums of G); ``bias``: a contiguous ``(n,)`` output of G's dtype. The result is
    what ``scores.finish_kernel`` followed by :func:`topk_indices` gives, bit for bit:
    the selected indices (and with ``return_rest=True``, ``(idx, rest)``), and in
    ``bias`` the bias gradient. ``out`` / ``rest_out``: optional preallocated int64
    buffers; ``traceable``: launch through ``torch.library.wrap_triton``. ``zero``: a
    contiguous tensor of any float dtype that more programs of the same launch fill with
    zeros while the one program selects (:data:`ZERO_BLOCK` elements a step, at most
    :data:`ZERO_PROGRAMS_PER_SM` programs per SM).
    """
    if (
        not isinstance(parts, torch.Tensor) or parts.dim() != 3 or parts.shape[0] != 2
        or parts.dtype != torch.float32 or not parts.is_contiguous()
    ):
        got = f"{parts.dtype} of shape {tuple(parts.shape)}" if isinstance(parts, torch.Tensor) else type(parts).__name__
        raise TypeError(f"parts must be a contiguous (2, split, n) float32 tensor; got {got}")
    split, n = parts.shape[1], parts.shape[2]
    if not 1 <= n <= MAX_FROM_PARTS or not 1 <= split or 2 * split * n >= 2**31:
        raise ValueError(
            f"parts must hold 1 to {MAX_FROM_PARTS} columns in 1 to 2**30 / n slices; got {tuple(parts.shape)}"
        )
    _launch.check_float_tensor("bias", bias, 1)
    device = parts.device
    if bias.shape[0] != n or bias.device != device or not bias.is_contiguous():
        raise ValueError(f"bias must be a contiguous ({n},) tensor on '{device}'; got {tuple(bias.shape)} on '{bias.device}'")
    k, out, rest_out = _k_and_outputs(n, k, return_rest, out, rest_out, device)
    zero_programs = _zero_programs(zero, device, traceable, parts, bias, out, rest_out)
    cfg = _from_parts_config()
    _launch.launchable(topk_kernel, traceable)[(1 + zero_programs,)](
        parts, out, rest_out if return_rest else out, bias, zero if zero_programs else bias,
        n, k, 1, split, zero.numel() if zero_programs else 0,
        BLOCK=cfg["BLOCK"], RADIX_BITS=cfg["RADIX_BITS"], WRITE_REST=return_rest, RESIDENT=True,
        CHUNK=cfg["BLOCK"], FROM_PARTS=True, ZERO_BLOCK=ZERO_BLOCK if zero_programs else 0,
        num_warps=cfg["num_warps"],
    )
    return (out, rest_out) if return_rest else out
