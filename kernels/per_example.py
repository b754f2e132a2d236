"""Per-example meProp (``unified=False``): per-row top-k, gathered grad_x, sorted grad_W.

For ``G: (M, out)``, ``X: (M, in)``, ``W: (out, in)`` and a set ``S_m`` of k units per
row m (``idx: (M, k)`` int64):

* :func:`row_topk_indices`: ``S_m`` = the k largest ``|G[m, :]|``, indices ascending per
  row, ties to the lower index, NaN and inf counted as +inf (the README's "Semantics") -- equal
  to ``reference.per_example_topk_indices``. One program per row. Rows of up to 16,384 units are
  held in registers (:func:`row_select_kernel`): keys in G's own bits, 15 of them for
  fp16 / bf16, found one bit at a time by counting (integer compares and adds, no
  histogram), then a second read of the row in index order writes the sorted indices.
  Longer rows stream (:func:`row_topk_kernel`: the radix select of :mod:`.topk`, 4
  rounds of 8 bits, then the compaction: 5 reads of the row). Either can write, in the
  same pass, the masked copy of G that the masked route's dense GEMMs take.
* :func:`gathered_rows_grad_input`: ``grad_x[m, :] = sum_t G[m, idx[m, t]] W[idx[m, t], :]``.
  Program (m, column block) walks row m's k indices ``BLOCK_T`` at a time: one load of
  the index tile, the matching values of G's row, and the gathered rows of W; fp32
  accumulation, one store. Every output element is written by one program.
* :func:`sorted_pairs_grad_weight`: ``grad_W[j, :] = sum_{m: j in S_m} G[m, j] X[m, :]``,
  the dense ``(out, in)`` gradient written in one pass (rows no example selected are
  zero). The ``M * k`` pairs ``(m, j)`` are first put in unit order with a counting sort
  (:func:`unit_lists`, no float atomics):

  1. ``mark``: a bitmask of the pairs, ``bits: (ceil(out / 32), M)`` int32 -- word
     column w (units 32 w ... 32 w + 31) contiguous over the rows -- set with integer
     ``atomic_or`` (the result is the same whatever order the ORs land in);
  2. ``count``: one program per 32-unit word column sums its bits over the rows:
     ``counts[j]``, the number of examples that selected unit j;
  3. ``scan``: one program, the exclusive prefix sum ``crow[j] = sum_{j' < j} counts[j']``;
  4. ``place``: the same programs as (2) again, now writing each pair's row m at
     ``crow[j] + #{m' < m : j in S_m'}`` (a prefix sum down the column), so each unit's
     list ``rows[crow[j]:crow[j + 1]]`` holds its examples in ascending order.

  Then program (unit block, column block) takes its ``BLOCK_J`` units one after the
  other: it adds ``G[m, j] * X[m, cols]`` over unit j's list, ``BLOCK_L`` rows at a
  time, in fp32, and stores the row (zeros for an empty list).

Deterministic, bit for bit: every float sum runs in a fixed order (the order of ``idx``
along a row for grad_x, ascending m for grad_W, fixed-shape reduction trees within a
tile), no float atomics, and the launch configs are picked from the shapes by a fixed
rule (no autotuning, whose timing-based choice could change the summation order
between processes). List offsets are int64; row ids in the lists are int32 (``M < 2**31``).
The configs are sized by what compiles without spills for sm_80 / sm_90 (the AOT
tests); none has been timed on a GPU yet.

Preconditions of the ``idx`` the products take: each row's indices distinct and in
``[0, out)`` (any order). Out-of-range entries are ignored (masked) rather than read out
of bounds; duplicates are not detected (the selection kernel and
``reference.per_example_random_indices`` never make them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from .topk import _sum_combine, compact_chunk

__all__ = [
    "row_topk_indices",
    "gathered_rows_grad_input",
    "sorted_pairs_grad_weight",
    "unit_lists",
    "select_configs",
    "grad_input_configs",
    "grad_weight_configs",
    "lists_configs",
    "pick_select_config",
    "pick_product_config",
    "row_topk_kernel",
    "row_select_kernel",
    "KEY_INF",
    "grad_input_kernel",
    "grad_weight_kernel",
    "mark_kernel",
    "column_bits_kernel",
    "scan_kernel",
]


# --- configs ---------------------------------------------------------------------------


def select_configs() -> list[dict]:
    """Configs of the per-row selection, picked by row length (:func:`pick_select_config`).

    ``RESIDENT``: :func:`row_select_kernel`, the row held in registers (``BLOCK >= out``),
    64 keys a thread or fewer (``BLOCK / (32 * num_warps)``): a row of 4096 units is
    one program of 2 warps. (8192 units take 8 warps, 32 keys a thread: with 4, the
    sm_80 build for a strided fp32 G spilled a register in the search's loop.) A
    short-row config keeps small layers (MNIST's 500 units) from wasting most of each
    program. Longer rows than the largest resident block stream through
    :func:`row_topk_kernel` (``RADIX_BITS``), five reads of the row.
    """
    return [
        {"BLOCK": 512, "CHUNK": 256, "RESIDENT": True, "num_warps": 1},
        {"BLOCK": 2048, "CHUNK": 256, "RESIDENT": True, "num_warps": 1},
        {"BLOCK": 4096, "CHUNK": 512, "RESIDENT": True, "num_warps": 2},
        {"BLOCK": 8192, "CHUNK": 1024, "RESIDENT": True, "num_warps": 8},
        {"BLOCK": 16384, "CHUNK": 2048, "RESIDENT": True, "num_warps": 8},
        {"BLOCK": 1024, "RESIDENT": False, "RADIX_BITS": 8, "num_warps": 4},
    ]


def grad_input_configs() -> list[dict]:
    """Configs of :func:`grad_input_kernel` (``BLOCK_T`` indices x ``BLOCK_N`` input columns),
    picked by in_features (:func:`pick_product_config`)."""
    return [
        {"BLOCK_T": 128, "BLOCK_N": 32, "num_warps": 4},
        {"BLOCK_T": 64, "BLOCK_N": 64, "num_warps": 4},
        {"BLOCK_T": 64, "BLOCK_N": 128, "num_warps": 8},
        {"BLOCK_T": 32, "BLOCK_N": 256, "num_warps": 8},
    ]


def grad_weight_configs() -> list[dict]:
    """Configs of :func:`grad_weight_kernel` (``BLOCK_J`` units per program, each walked
    ``BLOCK_L`` list rows x ``BLOCK_N`` input columns at a time), picked by in_features
    (:func:`pick_product_config`)."""
    return [
        {"BLOCK_J": 4, "BLOCK_L": 128, "BLOCK_N": 32, "num_warps": 4},
        {"BLOCK_J": 4, "BLOCK_L": 64, "BLOCK_N": 64, "num_warps": 4},
        {"BLOCK_J": 4, "BLOCK_L": 64, "BLOCK_N": 128, "num_warps": 8},
        {"BLOCK_J": 4, "BLOCK_L": 32, "BLOCK_N": 256, "num_warps": 8},
    ]


def lists_configs() -> list[dict]:
    """The one config of the counting-sort kernels: ``mark`` (``BLOCK`` indices per step),
    ``bits`` (``BLOCK_M`` rows x 32 units per step of count / place), ``scan``."""
    return [
        {
            "mark": {"BLOCK": 256, "num_warps": 2},
            "bits": {"BLOCK_M": 128, "num_warps": 4},
            "scan": {"BLOCK": 1024, "num_warps": 4},
        }
    ]


def pick_select_config(n_out: int) -> dict:
    """The first resident config whose block holds the row, else the streaming one (a
    fixed rule)."""
    cfgs = select_configs()
    for c in cfgs:
        if c["RESIDENT"] and n_out <= c["BLOCK"]:
            return c
    return next(c for c in cfgs if not c["RESIDENT"])


def pick_product_config(cfgs: list[dict], n_in: int) -> dict:
    """The first product config whose column block covers in_features, else the widest."""
    for c in cfgs:
        if n_in <= c["BLOCK_N"]:
            return c
    return cfgs[-1]


# --- kernels ---------------------------------------------------------------------------


#: Sort keys of |g| in g's own bits: the sign cleared, NaN (any payload) clamped to the
#: pattern of +inf. A non-negative float orders like its bit pattern, so the keys order
#: as the magnitudes do, NaN and inf tied at the top, -0 equal to +0 -- the order of
#: ``|g| as fp32`` with NaN as +inf, but in 15 bits for fp16 / bf16 (31 for fp32).
KEY_INF = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80, torch.float32: 0x7F800000}


@triton.jit
def _magnitude_keys(g, KEY_BITS: tl.constexpr, INF_KEY: tl.constexpr):
    """int32 keys of ``|g|`` (:data:`KEY_INF`)."""
    if KEY_BITS == 16:
        bits = g.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    else:
        bits = g.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return tl.minimum(bits, INF_KEY)


@triton.jit
def row_select_kernel(
    g_ptr, idx_ptr, masked_ptr,
    N, K, stride_gm, stride_gn, stride_im,
    BLOCK: tl.constexpr, CHUNK: tl.constexpr, KEY_BITS: tl.constexpr, INF_KEY: tl.constexpr,
    WRITE_MASKED: tl.constexpr,
):
    """Program m: the K largest ``|G[m, :]|`` (of ``N <= BLOCK``), indices ascending into
    ``idx[m, :K]``; with ``WRITE_MASKED``, row m of ``masked`` (contiguous, G's dtype)
    gets G's selected entries as they are (a select: signs, -0, inf and NaN kept) and +0
    everywhere else.

    The row is read once into registers as int32 keys (:data:`KEY_INF`: 15 bits for a
    16-bit G, 31 for fp32), and T, the K-th largest key, is found one bit at a time
    from the top: T keeps a bit when at least K keys are at or above it with that bit
    set. Each round is a compare and a count per key and one reduction: integer work
    only, no histogram; for a 16-bit G two keys share a register and one subtract
    compares both (about 2 instructions a key a round in the sm_90 SASS, 3.5 unpacked).
    Then the row is read again (L1 / L2: it was just read), ``CHUNK``
    units at a time in index order, and a prefix sum places every key > T and the
    first ``K - count(key > T)`` keys == T (lower indices win ties), as
    :func:`row_topk_kernel` does. The second read keeps the scattered index store (a
    layout of one element a thread, which Triton gives any store whose addresses are
    not contiguous) to a chunk: done on the whole resident row, its conversion of 64-bit
    addresses doubled the registers and spilled.
    """
    tl.static_assert(BLOCK <= 16384)  # the packed prefix sums below must not overflow
    row = tl.program_id(0).to(tl.int64)
    g_row = g_ptr + row * stride_gm
    offs = tl.arange(0, BLOCK)
    row_vals = tl.load(g_row + offs.to(tl.int64) * stride_gn, mask=offs < N, other=0.0)
    keys = tl.where(offs < N, _magnitude_keys(row_vals, KEY_BITS, INF_KEY), -1)  # -1: below every key

    # A loop, not unrolled: torch.compile's analysis of a Triton kernel's accesses
    # (torch._higher_order_ops.triton_kernel_wrap) ran for minutes on 31 unrolled rounds.
    thresh = tl.full([], 0, dtype=tl.int32)
    if KEY_BITS == 16:
        # Two 15-bit keys a register, each under a guard bit (bit 15 / 31): in
        # ``pair - cand * 0x10001`` no half borrows from the other (cand <= 0x7FFF), and
        # each half's guard bit stays set iff its key >= cand. One subtract, shift, mask
        # and add per two keys; the counts add up in the two halves (< 2**16 each).
        even, odd = tl.split(tl.reshape(tl.where(offs < N, keys, 0), [BLOCK // 2, 2]))
        pairs = (odd << 16) | even | -0x7FFF8000  # 0x80008000 as an int32
        for r in range(KEY_BITS - 1):
            cand = thresh | (1 << (KEY_BITS - 2 - r))
            both = tl.reduce(((pairs - cand * 0x10001) >> 15) & 0x10001, 0, _sum_combine)
            thresh = tl.where((both & 0xFFFF) + (both >> 16) >= K, cand, thresh)
        above = tl.reduce(((pairs - (thresh + 1) * 0x10001) >> 15) & 0x10001, 0, _sum_combine)
        need_eq = K - ((above & 0xFFFF) + (above >> 16))
    else:
        for r in range(KEY_BITS - 1):
            cand = thresh | (1 << (KEY_BITS - 2 - r))
            # keys >= cand counted by the sign of keys - cand (-1 below it; no overflow:
            # -1 <= keys < 2**31 - 1, 1 <= cand < 2**31): a subtract and a shift-add a key
            n_ge = BLOCK + tl.reduce((keys - cand) >> 31, 0, _sum_combine)
            thresh = tl.where(n_ge >= K, cand, thresh)
        need_eq = K - tl.reduce((keys > thresh).to(tl.int32), 0, _sum_combine)

    c_offs = tl.arange(0, CHUNK)
    n_gt = tl.full([], 0, dtype=tl.int32)
    n_eq = tl.full([], 0, dtype=tl.int32)
    for c0 in range(0, N, CHUNK):
        i = c0 + c_offs
        ok = i < N
        g = tl.load(g_row + i.to(tl.int64) * stride_gn, mask=ok, other=0.0)
        key = _magnitude_keys(g, KEY_BITS, INF_KEY)
        sel, pos, n_gt, n_eq = compact_chunk(key > thresh, key == thresh, ok, n_gt, n_eq, need_eq)
        tl.store(idx_ptr + row * stride_im + pos, i.to(tl.int64), mask=sel)
        if WRITE_MASKED:
            tl.store(masked_ptr + row * N + i, tl.where(sel, g, tl.zeros_like(g)), mask=ok)


@triton.jit
def row_topk_kernel(
    g_ptr, idx_ptr, masked_ptr,
    N, K, stride_gm, stride_gn, stride_im,
    BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr, KEY_BITS: tl.constexpr, INF_KEY: tl.constexpr,
    WRITE_MASKED: tl.constexpr = False,
):
    """Program m: the K largest ``|G[m, :]|`` (of N), indices ascending into ``idx[m, :K]``;
    ``WRITE_MASKED`` as in :func:`row_select_kernel`. Any N: rows too long to hold.

    The radix select of :func:`.topk.topk_kernel`'s streaming configs and the shared
    compaction (:func:`.topk.compact_chunk`), on row m's keys, streamed in blocks of
    ``BLOCK`` (five reads of the row). The keys are
    :func:`row_select_kernel`'s, shifted to the top of 32 bits: G's own bits, so no float
    operation can flush a subnormal to zero.
    """
    SHIFT: tl.constexpr = 32 - KEY_BITS
    BINS: tl.constexpr = 1 << RADIX_BITS
    ROUNDS: tl.constexpr = 32 // RADIX_BITS
    tl.static_assert(32 % RADIX_BITS == 0)
    tl.static_assert(BLOCK <= 16384)  # the packed prefix sum below must not overflow
    row = tl.program_id(0).to(tl.int64)
    g_row = g_ptr + row * stride_gm
    idx_row = idx_ptr + row * stride_im
    offs = tl.arange(0, BLOCK)
    bins = tl.arange(0, BINS)

    # Radix select of T, the K-th largest key (invariant as in topk_kernel).
    thresh = tl.full([], 0, dtype=tl.uint32)
    n_above = tl.full([], 0, dtype=tl.int32)
    for r in tl.static_range(ROUNDS):
        shift = 32 - (r + 1) * RADIX_BITS
        hist = tl.zeros([BINS], dtype=tl.int32)
        for c0 in range(0, N, BLOCK):
            i = c0 + offs
            ok = i < N
            g = tl.load(g_row + i.to(tl.int64) * stride_gn, mask=ok, other=0.0)
            key = (_magnitude_keys(g, KEY_BITS, INF_KEY) << SHIFT).to(tl.uint32)
            if r > 0:
                ok = ok & ((key >> (shift + RADIX_BITS)) == (thresh >> (shift + RADIX_BITS)))
            key_digit = ((key >> shift) & (BINS - 1)).to(tl.int32)
            hist += tl.histogram(key_digit, BINS, mask=ok)
        at_least = n_above + tl.associative_scan(hist, 0, _sum_combine, reverse=True)
        digit = tl.reduce((at_least >= K).to(tl.int32), 0, _sum_combine) - 1
        n_above += tl.reduce(tl.where(bins > digit, hist, 0), 0, _sum_combine)
        thresh = thresh | (digit.to(tl.uint32) << shift)
    need_eq = K - n_above

    # Compaction in index order: keys > T, then the first need_eq keys == T.
    n_gt = tl.full([], 0, dtype=tl.int32)
    n_eq = tl.full([], 0, dtype=tl.int32)
    for c0 in range(0, N, BLOCK):
        i = c0 + offs
        ok = i < N
        g = tl.load(g_row + i.to(tl.int64) * stride_gn, mask=ok, other=0.0)
        key = (_magnitude_keys(g, KEY_BITS, INF_KEY) << SHIFT).to(tl.uint32)
        sel, pos, n_gt, n_eq = compact_chunk(key > thresh, key == thresh, ok, n_gt, n_eq, need_eq)
        tl.store(idx_row + pos, i.to(tl.int64), mask=sel)
        if WRITE_MASKED:
            tl.store(masked_ptr + row * N + i, tl.where(sel, g, tl.zeros_like(g)), mask=ok)


@triton.jit
def grad_input_kernel(
    g_ptr, w_ptr, idx_ptr, out_ptr,
    N, NOUT, K,
    stride_gm, stride_gn, stride_wo, stride_wi, stride_im, stride_ik, stride_om, stride_on,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (m, n): ``out[m, cols] = sum_t G[m, idx[m, t]] * W[idx[m, t], cols]``.

    ``N`` = in_features, ``NOUT`` = out_features (indices outside ``[0, NOUT)`` are
    skipped), ``K`` = indices per row. fp32: lane t of a ``[BLOCK_T, BLOCK_N]`` accumulator
    adds terms t, t + BLOCK_T, ... in order, then one fixed reduction over the lanes.
    """
    row = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rt = tl.arange(0, BLOCK_T)
    g_row = g_ptr + row * stride_gm
    idx_row = idx_ptr + row * stride_im
    w_cols = w_ptr + rn[None, :] * stride_wi
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)  # lane t adds terms t, t + BLOCK_T, ...
    for t0 in range(0, K, BLOCK_T):
        t = t0 + rt
        sel = tl.load(idx_row + t.to(tl.int64) * stride_ik, mask=t < K, other=-1)
        ok = (sel >= 0) & (sel < NOUT)
        v = tl.load(g_row + sel * stride_gn, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(w_cols + sel[:, None] * stride_wo, mask=ok[:, None] & n_ok[None, :], other=0.0)
        acc += v[:, None] * w.to(tl.float32)
    res = tl.reduce(acc, 0, _sum_combine)  # one fixed-shape reduction tree at the end
    tl.store(out_ptr + row * stride_om + rn * stride_on, res.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def mark_kernel(
    idx_ptr, bits_ptr,
    M, NOUT, K, stride_im, stride_ik,
    BLOCK: tl.constexpr,
):
    """Program m: set bit ``j % 32`` of ``bits[j // 32, m]`` for each ``j`` in ``idx[m, :]``.

    ``bits`` (``(ceil(NOUT / 32), M)``) must be zero; integer ORs give the same words in
    any order.
    """
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    for t0 in range(0, K, BLOCK):
        t = t0 + offs
        sel = tl.load(idx_ptr + row * stride_im + t.to(tl.int64) * stride_ik, mask=t < K, other=-1)
        ok = (sel >= 0) & (sel < NOUT)
        word = (sel >> 5) * M + row
        bit = tl.full([BLOCK], 1, dtype=tl.int32) << (sel & 31).to(tl.int32)
        tl.atomic_or(bits_ptr + word, bit, mask=ok, sem="relaxed")


@triton.jit
def column_bits_kernel(
    bits_ptr, counts_ptr, crow_ptr, rows_ptr,
    M, NOUT,
    BLOCK_M: tl.constexpr, PLACE: tl.constexpr,
):
    """Program w: units ``32 w ... 32 w + 31``, walking the rows ``BLOCK_M`` at a time.

    ``PLACE=False``: ``counts[j]`` = rows whose bit j is set. ``PLACE=True``: each set bit
    (m, j) writes m to ``rows[crow[j] + #{m' < m with bit (m', j)}]``.
    """
    w = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, 32)
    unit = w * 32 + lane
    u_ok = unit < NOUT
    rm0 = tl.arange(0, BLOCK_M)
    if PLACE:
        base = tl.load(crow_ptr + unit, mask=u_ok, other=0)  # int64
    else:
        total = tl.zeros([32], dtype=tl.int32)
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + rm0
        m_ok = rm < M
        words = tl.load(bits_ptr + w * M + rm, mask=m_ok, other=0)  # contiguous
        b = (words[:, None] >> lane[None, :]) & 1  # [BLOCK_M, 32] int32, 0 or 1
        if PLACE:
            rank = tl.associative_scan(b, 0, _sum_combine)  # inclusive: this pair's 1-based place in its column
            pos = base[None, :] + (rank - 1).to(tl.int64)
            tl.store(rows_ptr + pos, (rm[:, None] + 0 * lane[None, :]).to(tl.int32), mask=b != 0)
            base += tl.reduce(b, 0, _sum_combine).to(tl.int64)
        else:
            total += tl.reduce(b, 0, _sum_combine)
    if not PLACE:
        tl.store(counts_ptr + unit, total, mask=u_ok)


@triton.jit
def scan_kernel(counts_ptr, crow_ptr, N, BLOCK: tl.constexpr):
    """One program: ``crow[0] = 0``, ``crow[j + 1] = counts[0] + ... + counts[j]`` (int64)."""
    offs = tl.arange(0, BLOCK)
    carry = tl.full([], 0, dtype=tl.int64)
    tl.store(crow_ptr, carry)
    for c0 in range(0, N, BLOCK):
        i = c0 + offs
        ok = i < N
        c = tl.load(counts_ptr + i, mask=ok, other=0).to(tl.int64)
        tl.store(crow_ptr + 1 + i, carry + tl.associative_scan(c, 0, _sum_combine), mask=ok)
        carry += tl.reduce(c, 0, _sum_combine)


@triton.jit
def grad_weight_kernel(
    g_ptr, x_ptr, crow_ptr, rows_ptr, out_ptr,
    N, NOUT,
    stride_gm, stride_gn, stride_xm, stride_xi, stride_wo, stride_wi,
    BLOCK_J: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (u, n): for each unit j of ``[u * BLOCK_J, (u + 1) * BLOCK_J)`` (one after
    the other), ``out[j, cols] = sum over m in rows[crow[j]:crow[j+1]] of G[m, j] X[m, cols]``.

    ``N`` = in_features, ``NOUT`` = out_features. Each list is walked in order,
    ``BLOCK_L`` rows at a time, into a ``[BLOCK_L, BLOCK_N]`` fp32 accumulator reduced
    once at the end; an empty list stores zeros.
    """
    j0 = tl.program_id(0).to(tl.int64) * BLOCK_J
    pid_n = tl.program_id(1).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rl = tl.arange(0, BLOCK_L)
    x_cols = x_ptr + rn[None, :] * stride_xi
    out_cols = out_ptr + rn * stride_wi
    for j in range(j0, tl.minimum(j0 + BLOCK_J, NOUT)):
        crow_j = crow_ptr + j
        lo = tl.load(crow_j)
        hi = tl.load(crow_j + 1)
        g_col = g_ptr + j * stride_gn
        acc = tl.zeros([BLOCK_L, BLOCK_N], dtype=tl.float32)  # lane l adds entries l, l + BLOCK_L, ...
        for c0 in range(lo, hi, BLOCK_L):
            c = c0 + rl
            ok = c < hi
            m = tl.load(rows_ptr + c, mask=ok, other=0).to(tl.int64)
            v = tl.load(g_col + m * stride_gm, mask=ok, other=0.0).to(tl.float32)
            x = tl.load(x_cols + m[:, None] * stride_xm, mask=ok[:, None] & n_ok[None, :], other=0.0)
            acc += v[:, None] * x.to(tl.float32)
        res = tl.reduce(acc, 0, _sum_combine)
        tl.store(out_cols + j * stride_wo, res.to(out_ptr.dtype.element_ty), mask=n_ok)


# --- launchers -------------------------------------------------------------------------

#: Copy ``weight`` / ``x`` to a contiguous tensor once when their last dimension is not
#: unit-stride: both products load whole row segments of them, which a non-unit stride
#: turns into one address per element. G is only gathered (one element per index) and is
#: used as it comes. Tests switch this off to run the kernels' general-stride code.
COPY_NON_UNIT_INNER = True


def _unit_inner(t: torch.Tensor) -> torch.Tensor:
    if COPY_NON_UNIT_INNER and t.shape[1] > 1 and t.stride(1) != 1:
        return t.contiguous()
    return t


def _check_idx(idx: torch.Tensor, M: int, n_out: int, device) -> int:
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.int64:
        got = f"{idx.dtype} of shape {tuple(idx.shape)}" if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise TypeError(f"idx must be a 2-D int64 tensor (M, k); got {got}")
    if idx.shape[0] != M:
        raise ValueError(f"idx has {idx.shape[0]} rows; grad has {M}")
    if idx.device != device:
        raise ValueError(f"idx is on '{idx.device}' but the data is on '{device}'")
    k = idx.shape[1]
    if k > n_out:
        raise ValueError(f"idx has {k} indices per row; there are only {n_out} units")
    return k


def _check_pair(grad, other, other_name):
    _launch.check_float_tensor("grad", grad, 2)
    _launch.check_float_tensor(other_name, other, 2)
    if other.dtype != grad.dtype or other.device != grad.device:
        raise TypeError(
            f"grad and {other_name} must share dtype and device; got {grad.dtype} on "
            f"'{grad.device}' and {other.dtype} on '{other.device}'"
        )


def row_topk_indices(
    grad: torch.Tensor,
    k: int,
    *,
    out: torch.Tensor | None = None,
    masked: torch.Tensor | None = None,
    config: dict | None = None,
    traceable: bool = False,
) -> torch.Tensor:
    """``(M, k)`` int64: per row of ``grad: (M, out)`` the k largest ``|grad[m, :]|``, ascending.

    Ties to the lower index, NaN/inf as +inf (the README's "Semantics"): equal to
    ``reference.per_example_topk_indices(grad, k)``. Any strides. ``out``: optional contiguous int64
    ``(M, k)`` buffer; ``masked``: optional contiguous ``(M, out)`` buffer of grad's
    dtype, written in the same pass with grad's selected entries (bit for bit) and +0
    elsewhere (the masked route's copy of G); ``config``: one of :func:`select_configs`
    (default: :func:`pick_select_config`); ``traceable``: launch through
    ``torch.library.wrap_triton`` (inside a ``triton_op``).
    """
    _launch.check_float_tensor("grad", grad, 2)
    M, n = grad.shape
    k = int(k)
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in [1, {n}] for rows of {n} units; got {k}")
    out = _launch.out_or_empty("out", out, (M, k), torch.int64, grad.device)
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    if masked is not None:
        _launch.check_out("masked", masked, (M, n), grad.dtype, grad.device)
        if not masked.is_contiguous():
            raise ValueError("masked must be contiguous")
        # (traceable: a fresh buffer of the op's own, maybe a fake tensor without memory)
        if not traceable and M and masked.untyped_storage().data_ptr() == grad.untyped_storage().data_ptr():
            raise ValueError("masked must not share memory with grad (the kernel reads grad while it writes masked)")
    if config is not None and config not in select_configs():
        raise ValueError(f"config must be one of select_configs(); got {config!r}")
    if M == 0:
        return out
    cfg = config if config is not None else pick_select_config(n)
    if cfg["RESIDENT"] and n > cfg["BLOCK"]:
        raise ValueError(f"config {cfg} holds rows of at most {cfg['BLOCK']} units; got {n}")
    write_masked = masked is not None
    masked = masked if write_masked else out  # an unused pointer
    args = (grad, out, masked, n, k, grad.stride(0), grad.stride(1), out.stride(0))
    keys = dict(KEY_BITS=8 * grad.element_size(), INF_KEY=KEY_INF[grad.dtype])
    if cfg["RESIDENT"]:
        _launch.launchable(row_select_kernel, traceable)[(M,)](
            *args, BLOCK=cfg["BLOCK"], CHUNK=cfg["CHUNK"], **keys,
            WRITE_MASKED=write_masked, num_warps=cfg["num_warps"],
        )
    else:
        _launch.launchable(row_topk_kernel, traceable)[(M,)](
            *args, BLOCK=cfg["BLOCK"], RADIX_BITS=cfg["RADIX_BITS"], **keys,
            WRITE_MASKED=write_masked, num_warps=cfg["num_warps"],
        )
    return out


def gathered_rows_grad_input(
    grad: torch.Tensor,
    weight: torch.Tensor,
    idx: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    config: dict | None = None,
    traceable: bool = False,
) -> torch.Tensor:
    """``grad_x[m] = sum_t grad[m, idx[m, t]] * weight[idx[m, t], :]``, ``(M, in)`` in grad's dtype.

    ``grad: (M, out)``, ``weight: (out, in)`` (any strides), ``idx: (M, k)`` int64, each
    row's indices distinct and in ``[0, out)``, any order. ``out``: optional buffer (any
    strides); ``config``: one of :func:`grad_input_configs`; ``traceable``: see
    :func:`row_topk_indices`.
    """
    _check_pair(grad, weight, "weight")
    M, n_out = grad.shape
    if weight.shape[0] != n_out:
        raise ValueError(f"weight {tuple(weight.shape)} does not match grad {tuple(grad.shape)}")
    k = _check_idx(idx, M, n_out, grad.device)
    weight = _unit_inner(weight)
    n_in = weight.shape[1]
    out = _launch.out_or_empty("out", out, (M, n_in), grad.dtype, grad.device)
    if M == 0 or n_in == 0:
        return out
    cfg = config or pick_product_config(grad_input_configs(), n_in)
    grid = (M, _launch.cdiv(n_in, cfg["BLOCK_N"]))
    _launch.launchable(grad_input_kernel, traceable)[grid](
        grad, weight, idx, out, n_in, n_out, k,
        grad.stride(0), grad.stride(1), weight.stride(0), weight.stride(1),
        idx.stride(0), idx.stride(1), out.stride(0), out.stride(1),
        BLOCK_T=cfg["BLOCK_T"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
    )
    return out


def unit_lists(
    idx: torch.Tensor,
    n_out: int,
    *,
    traceable: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs of ``idx: (M, k)`` in unit order: ``(crow, rows)``.

    ``crow: (n_out + 1,)`` int64 offsets, ``rows: (M * k,)`` int32: unit j's examples
    are ``rows[crow[j]:crow[j + 1]]``, ascending (the CSR of the transposed selection).
    A deterministic counting sort (see the module docstring); indices outside
    ``[0, n_out)`` are dropped, so ``crow[-1]`` counts the valid pairs.
    """
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.int64:
        raise TypeError("idx must be a 2-D int64 tensor")
    M, k = idx.shape
    device = idx.device
    n_words = _launch.cdiv(n_out, 32)
    cfg = lists_configs()[0]
    crow = torch.empty(n_out + 1, dtype=torch.int64, device=device)
    rows = torch.empty(M * k, dtype=torch.int32, device=device)
    if n_out == 0:
        crow.zero_()
        return crow, rows
    counts = torch.empty(n_out, dtype=torch.int32, device=device)
    if M == 0 or k == 0:
        counts.zero_()
    else:
        bits = torch.zeros((n_words, M), dtype=torch.int32, device=device)
        mc = cfg["mark"]
        _launch.launchable(mark_kernel, traceable)[(M,)](
            idx, bits, M, n_out, k, idx.stride(0), idx.stride(1),
            BLOCK=mc["BLOCK"], num_warps=mc["num_warps"],
        )
        bc = cfg["bits"]
        _launch.launchable(column_bits_kernel, traceable)[(n_words,)](
            bits, counts, crow, rows, M, n_out,
            BLOCK_M=bc["BLOCK_M"], PLACE=False, num_warps=bc["num_warps"],
        )
    sc = cfg["scan"]
    _launch.launchable(scan_kernel, traceable)[(1,)](
        counts, crow, n_out, BLOCK=sc["BLOCK"], num_warps=sc["num_warps"],
    )
    if M > 0 and k > 0:
        _launch.launchable(column_bits_kernel, traceable)[(n_words,)](
            bits, counts, crow, rows, M, n_out,
            BLOCK_M=bc["BLOCK_M"], PLACE=True, num_warps=bc["num_warps"],
        )
    return crow, rows


def sorted_pairs_grad_weight(
    grad: torch.Tensor,
    x: torch.Tensor,
    idx: torch.Tensor | None = None,
    *,
    lists: tuple[torch.Tensor, torch.Tensor] | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
    traceable: bool = False,
) -> torch.Tensor:
    """The dense ``(out, in)`` weight gradient of per-example meProp, in grad's dtype.

    ``grad_W[j, :] = sum_{m: j in idx[m, :]} grad[m, j] * x[m, :]``, zero rows for units
    no example selected; every element written once. ``grad: (M, out)``, ``x: (M, in)``
    (any strides); ``idx: (M, k)`` int64 (rows of distinct indices in ``[0, out)``), or
    ``lists``: its ``(crow, rows)`` from :func:`unit_lists`. ``out``: optional buffer
    (any strides); ``config``: one of :func:`grad_weight_configs`; ``traceable``: see
    :func:`row_topk_indices`.
    """
    _check_pair(grad, x, "x")
    M, n_out = grad.shape
    if x.shape[0] != M:
        raise ValueError(f"x {tuple(x.shape)} and grad {tuple(grad.shape)} need the same rows")
    if lists is None:
        if idx is None:
            raise TypeError("pass idx or lists")
        _check_idx(idx, M, n_out, grad.device)
        lists = unit_lists(idx, n_out, traceable=traceable)
    crow, rows = lists
    if tuple(crow.shape) != (n_out + 1,) or crow.dtype != torch.int64 or rows.dtype != torch.int32:
        raise ValueError("lists must be (crow (out + 1,) int64, rows int32) from unit_lists")
    x = _unit_inner(x)
    n_in = x.shape[1]
    out = _launch.out_or_empty("out", out, (n_out, n_in), grad.dtype, grad.device)
    if n_out == 0 or n_in == 0:
        return out
    cfg = config or pick_product_config(grad_weight_configs(), n_in)
    grid = (_launch.cdiv(n_out, cfg["BLOCK_J"]), _launch.cdiv(n_in, cfg["BLOCK_N"]))
    _launch.launchable(grad_weight_kernel, traceable)[grid](
        grad, x, crow, rows, out, n_in, n_out,
        grad.stride(0), grad.stride(1), x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        BLOCK_J=cfg["BLOCK_J"], BLOCK_L=cfg["BLOCK_L"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
    )
    return out
