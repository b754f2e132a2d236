"""The compacted meProp products: the selected units gathered inside the GEMM loads.

With ``S = idx`` (k selected output units, int64, any order; ascending from
:mod:`.topk` keeps the gathers as local as they can be):

* :func:`gathered_grad_input`: ``grad_x = G[:, S] @ W[S, :]`` -- an ``(M, in)`` GEMM whose
  reduction runs over the k selected units. Each K step loads one tile of ``S`` and uses it
  for both operands: the columns ``G[rows, S_tile]`` and the rows ``W[S_tile, cols]``.
* :func:`scattered_grad_weight`: the dense ``grad_W``. The product programs compute
  ``(G[:, S]^T @ X)`` tiles and store them straight into rows ``S`` of ``grad_W``; the
  remaining programs write zeros into the ``out - k`` other rows (given by ``rest``, the
  complement from :func:`.topk.topk_indices`). When those tiles are too few to fill the
  GPU (k of a few hundred), the token reduction is split (:func:`weight_split`): each
  program reduces a slice of the tokens into an fp32 workspace, and
  :func:`split_reduce_kernel` adds the slices in a fixed order and writes the rows,
  zeros included. Either way every element of ``grad_W`` is written exactly once: no
  ``zeros()`` + ``index_copy_``.
* :func:`gather_columns`: ``G[:, S]`` as a dense ``(M, k)`` tensor, padded with zero
  columns to a multiple of 16 (:data:`PAD_COLUMNS`). Both GEMMs take it as
  ``grad_selected=`` and then read G's part densely, as asynchronous copies, instead of
  gathering it (``W``'s rows are still gathered in the loads, and ``grad_W``'s rows still
  scattered in the stores).

Which of the two ways to read ``G[:, S]`` is faster is a GPU measurement (see
:mod:`meprop_triton.triton_ops`, which picks one): gathering in the loads needs no
``(M, k)`` temporary, but a row-major G gives each gathered element its own 32-byte
sector, re-read for every column tile of the output; compacting reads those sectors once.

G is used with whatever strides it has; ``weight`` / ``x`` are made contiguous once
first if their last dimension is not unit-stride (:data:`COPY_NON_UNIT_INNER`), any row
stride is used as it is. Both GEMMs accumulate in fp32 with ``tl.dot`` (tf32 for fp32
inputs only when ``torch.backends.cuda.matmul.allow_tf32`` is True) and store in the
input dtype. Offsets are int64; all strides are runtime arguments. Programs are ordered
in groups of ``GROUP_M`` row tiles (L2 reuse of the gathered operand). Results are
deterministic for a given config: no atomics, one program owns each output tile (of
grad_W's workspace slices, with split-K). Where the autotuner picks the config (by
timing, once per process), another process may pick another one, whose tiles and
split-K slices sum in another order.

``bench/codegen.py`` reports what each launch compiles to (MMA kind, asynchronous
operand loads, spills, shared memory, programs); ``tests/kernels/test_codegen.py``
holds the sm_90 code to ``wgmma`` fed asynchronously, with no spills, at k = 41, 205,
410 and 1024.
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
    "gather_columns",
    "gather_configs",
    "gather_columns_kernel",
    "grad_input_configs",
    "grad_weight_configs",
    "grad_input_kernel",
    "grad_weight_kernel",
    "input_precision_for",
    "prune_configs",
    "keep_config",
    "split_reduce_kernel",
    "reduce_configs",
    "weight_split",
    "padded_width",
]


def _cfg(bm, bn, bk, warps, stages, group=8):
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
        num_warps=warps, num_stages=stages,
    )


def grad_input_configs() -> list:
    """Autotune configs of :func:`grad_input_kernel`; the first is the single test config.

    BLOCK_M: rows of G (tokens); BLOCK_N: columns of grad_x (in); BLOCK_K: selected units.
    The 32-row tile serves the interpreter, sm_80 and plain fp32; on sm_90
    :func:`keep_config` keeps the tiles of 64 rows or more, which ``wgmma`` takes.
    """
    return [
        _cfg(32, 64, 32, 4, 2),
        _cfg(64, 64, 32, 4, 3),
        _cfg(64, 128, 32, 4, 4),
        _cfg(128, 64, 32, 4, 4),
        _cfg(128, 128, 32, 8, 3),
        _cfg(128, 256, 32, 8, 3),
        _cfg(128, 128, 64, 8, 3),
        _cfg(128, 256, 64, 8, 3),
    ]


def grad_weight_configs() -> list:
    """Autotune configs of :func:`grad_weight_kernel`; the first is the single test config.

    BLOCK_M: selected units (rows of grad_W); BLOCK_N: in; BLOCK_K: tokens (the reduction).
    No tile exceeds :data:`MAX_WEIGHT_TILE` elements: k is often only a few hundred, and
    :func:`weight_split` sizes the split-K from that bound so that every config fills
    the GPU.
    """
    return [
        _cfg(32, 64, 32, 4, 2),
        _cfg(32, 32, 32, 4, 2),
        _cfg(32, 128, 64, 4, 3),
        _cfg(64, 64, 64, 4, 3),
        _cfg(64, 128, 32, 4, 4),
        _cfg(128, 128, 32, 8, 3),
        _cfg(64, 256, 32, 8, 3),
        _cfg(64, 128, 64, 4, 4),
        _cfg(128, 128, 64, 8, 3),
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
    M, N, K, KA,
    stride_gm, stride_gn, stride_wo, stride_wi, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, INPUT_PRECISION: tl.constexpr, GATHER_G: tl.constexpr,
):
    """``out[M, N] = G[:, idx] @ W[idx, :]``; ``N`` = in_features, ``K`` = len(idx).

    ``GATHER_G``: ``g_ptr`` is the whole G and its columns ``idx`` are gathered here;
    otherwise ``g_ptr`` is the compacted ``G[:, idx]``, ``(M, KA)`` with ``KA >= K`` and
    zeros in columns ``[K, KA)`` (:func:`gather_columns` pads KA to a multiple of 16, so
    that the mask of this contiguous load is constant over whole vectors and the load
    becomes an asynchronous copy feeding the MMA), read densely.
    """
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
        if GATHER_G:
            a = tl.load(g_rows + sel[None, :] * stride_gn, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        else:  # padding columns hold zeros; W's rows there are masked to zero below
            a = tl.load(
                g_rows + kk.to(tl.int64)[None, :] * stride_gn, mask=m_ok[:, None] & (kk < KA)[None, :], other=0.0
            )
        b = tl.load(w_cols + sel[:, None] * stride_wo, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    out = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def grad_weight_kernel(
    g_ptr, x_ptr, idx_ptr, rest_ptr, out_ptr, ws_ptr,
    M, N, K, R, KA, SPLIT,
    stride_gm, stride_gn, stride_xm, stride_xi, stride_wo, stride_wi,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, INPUT_PRECISION: tl.constexpr, GATHER_G: tl.constexpr,
    USE_WS: tl.constexpr,
):
    """Rows ``idx`` of ``out`` get ``G[:, idx]^T @ X``; rows ``rest`` get zeros.

    ``M`` tokens (the reduction), ``N`` = in_features, ``K`` = len(idx), ``R`` = len(rest).
    ``GATHER_G``: as in :func:`grad_input_kernel` (``g_ptr`` is G, or the compacted
    ``G[:, idx]`` of width ``KA``, zero beyond K).

    ``USE_WS`` False: programs ``[0, P)`` are the product tiles, stored straight into
    rows ``idx`` of ``out``; programs ``[P, P + Z)`` write the zero rows.
    ``USE_WS`` True (split-K): the tokens are cut into ``SPLIT`` slices of whole
    ``BLOCK_K`` steps; program ``s * P + tile`` reduces slice ``s`` of one tile and
    stores its fp32 sum in ``ws[s, rows, cols]`` (``ws``: ``(SPLIT, K, N)``, contiguous);
    :func:`split_reduce_kernel` then adds the slices in order and writes ``out``. Both
    ways are deterministic (no atomics).
    """
    pid = tl.program_id(0)
    num_pid_k = tl.cdiv(K, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_k * num_pid_n
    if USE_WS:
        num_prod = num_tiles * SPLIT
    else:
        num_prod = num_tiles
    if pid < num_prod:
        # Slice-major order: the programs running together share one slice of tokens
        # (its rows of X and of the compacted G stay in L2).
        s = pid // num_tiles
        pid_r, pid_n = _tile_ids(pid % num_tiles, num_pid_k, num_pid_n, GROUP_M)
        rr = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
        r_ok = rr < K
        rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        rt = tl.arange(0, BLOCK_K).to(tl.int64)
        if GATHER_G:
            sel_a = tl.load(idx_ptr + rr, mask=r_ok, other=0)
            g_cols = g_ptr + sel_a[:, None] * stride_gn  # A[i, t] = G[t, idx[i]]
            a_ok = r_ok
        else:
            g_cols = g_ptr + rr[:, None].to(tl.int64) * stride_gn  # A[i, t] = G_S[t, i]
            a_ok = rr < KA  # padding columns are zeros: whole vectors, an async copy
        x_cols = x_ptr + rn[None, :] * stride_xi
        if USE_WS:
            steps = tl.cdiv(tl.cdiv(M, SPLIT), BLOCK_K)
            t_first = s * steps * BLOCK_K
        else:
            steps = tl.cdiv(M, BLOCK_K)
            t_first = 0
        t_end = tl.minimum(t_first + steps * BLOCK_K, M)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for i in range(0, steps):
            t = t_first + i * BLOCK_K + rt
            t_ok = t < t_end
            a = tl.load(g_cols + t[None, :] * stride_gm, mask=a_ok[:, None] & t_ok[None, :], other=0.0)
            b = tl.load(x_cols + t[:, None] * stride_xm, mask=t_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if USE_WS:
            part = ws_ptr + (s * K + rr[:, None]).to(tl.int64) * N + rn[None, :]
            tl.store(part, acc, mask=r_ok[:, None] & n_ok[None, :])
        else:
            sel = tl.load(idx_ptr + rr, mask=r_ok, other=0)
            out = out_ptr + sel[:, None] * stride_wo + rn[None, :] * stride_wi
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & n_ok[None, :])
    else:
        _zero_rows(pid - num_prod, rest_ptr, out_ptr, R, N, stride_wo, stride_wi, BLOCK_M, BLOCK_N)


@triton.jit
def _zero_rows(z, rest_ptr, out_ptr, R, N, stride_wo, stride_wi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Zero tile ``z``: rows ``rest[...]`` of ``out``, BLOCK_M x BLOCK_N of them."""
    num_pid_n = tl.cdiv(N, BLOCK_N)
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


@triton.jit
def split_reduce_kernel(
    ws_ptr, idx_ptr, rest_ptr, out_ptr,
    N, K, R, SPLIT, stride_ws,
    stride_wo, stride_wi,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Rows ``idx`` of ``out`` = ``sum_s ws[s]`` (s = 0, 1, ... in order, fp32), cast to
    ``out``'s dtype; then the zero rows ``rest``: every element of ``out`` written once.
    ``stride_ws``: elements between slices (``K * N``, from the host: a size argument
    equal to 1 becomes a constant at launch, on which no tensor method can be called)."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_sel = tl.cdiv(K, BLOCK_M) * num_pid_n
    if pid < num_sel:
        pid_r = pid // num_pid_n
        pid_n = pid % num_pid_n
        rr = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
        r_ok = rr < K
        rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        mask = r_ok[:, None] & n_ok[None, :]
        part = ws_ptr + rr[:, None].to(tl.int64) * N + rn[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for _ in range(0, SPLIT):  # slice 0, 1, ...: a fixed order
            acc += tl.load(part, mask=mask, other=0.0)
            part += stride_ws
        sel = tl.load(idx_ptr + rr, mask=r_ok, other=0)
        out = out_ptr + sel[:, None] * stride_wo + rn[None, :] * stride_wi
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        _zero_rows(pid - num_sel, rest_ptr, out_ptr, R, N, stride_wo, stride_wi, BLOCK_M, BLOCK_N)


def reduce_configs() -> list[dict]:
    """The launch config of :func:`split_reduce_kernel` (one: it is bandwidth-bound)."""
    return [{"BLOCK_M": 16, "BLOCK_N": 256, "num_warps": 4}]


def gather_configs() -> list[dict]:
    """The launch config of :func:`gather_columns_kernel` (one: it is bandwidth-bound).
    ``BLOCK_M`` x ``BLOCK_K``: the tile of G's columns; ``W_ROWS`` x ``W_COLS``: the tile
    of W's rows (``weight=``)."""
    return [{"BLOCK_M": 64, "BLOCK_K": 64, "W_ROWS": 16, "W_COLS": 256, "num_warps": 4}]


@triton.jit
def gather_columns_kernel(
    g_ptr, idx_ptr, out_ptr, w_ptr, w_out_ptr,
    M, K, KP, NW,
    stride_gm, stride_gn, stride_om, stride_ok, stride_wo, stride_wi,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    WITH_W: tl.constexpr = False, W_ROWS: tl.constexpr = 16, W_COLS: tl.constexpr = 256,
):
    """``out[:, :K] = G[:, idx]``, ``out[:, K:KP] = 0``: one read of the selected
    columns, a dense write. Programs ``[0, P)`` (``P`` = G's tiles, row tiles major).

    ``WITH_W``: programs ``[P, ...)`` also write ``w_out[:K] = W[idx]`` and
    ``w_out[K:KP] = 0`` (``w_out``: ``(KP, NW)`` contiguous), ``W_ROWS`` x ``W_COLS`` at a
    time; otherwise ``w_ptr``, ``w_out_ptr``, ``NW`` and W's strides are unused."""
    pid = tl.program_id(0)
    num_k = tl.cdiv(KP, BLOCK_K)
    num_g = tl.cdiv(M, BLOCK_M) * num_k
    if pid < num_g:
        pid_m = (pid // num_k).to(tl.int64)
        pid_k = (pid % num_k).to(tl.int64)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        m_ok = rm < M
        k_ok = rk < K
        sel = tl.load(idx_ptr + rk, mask=k_ok, other=0)
        g = tl.load(g_ptr + rm[:, None] * stride_gm + sel[None, :] * stride_gn,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        tl.store(out_ptr + rm[:, None] * stride_om + rk[None, :] * stride_ok, g, mask=m_ok[:, None] & (rk < KP)[None, :])
    elif WITH_W:
        # names of their own: Triton types a name by both branches of an if
        w = pid - num_g
        num_c = tl.cdiv(NW, W_COLS)
        w_rows = (w // num_c).to(tl.int64) * W_ROWS + tl.arange(0, W_ROWS)
        w_cols = (w % num_c).to(tl.int64) * W_COLS + tl.arange(0, W_COLS)
        w_sel = tl.load(idx_ptr + w_rows, mask=w_rows < K, other=0)
        w_tile = tl.load(w_ptr + w_sel[:, None] * stride_wo + w_cols[None, :] * stride_wi,
                         mask=(w_rows < K)[:, None] & (w_cols < NW)[None, :], other=0.0)
        tl.store(w_out_ptr + w_rows[:, None] * NW + w_cols[None, :], w_tile,
                 mask=(w_rows < KP)[:, None] & (w_cols < NW)[None, :])


def _triton_before(major: int, minor: int) -> bool:
    try:
        got = tuple(int(p) for p in triton.__version__.split(".")[:2])
    except ValueError:  # a local build with an odd version string: assume it is new
        return False
    return got < (major, minor)


#: Shared memory a block may use (opt-in maximum): A100 163 KiB, H100 / H200 227 KiB.
SHARED_LIMIT = {8: 167936, 9: 232448}


def keep_config(config, dtype, input_precision, capability, old_triton=None, gather=False, smem=None) -> bool:
    """Whether the autotuner may try ``config`` for ``dtype`` operands with this
    ``input_precision`` on a GPU of compute ``capability`` ((major, minor)); ``gather``:
    G's columns are gathered inside the GEMM's loads (``GATHER_G``).

    * Plain fp32 (``ieee``, no tensor cores): tiles up to 64 x 64 x 32 only; its
      FMA-based ``tl.dot`` spills registers beyond that.
    * Tensor cores on sm_90 (16-bit inputs, or tf32) with the compacted G: tiles of at
      least 64 rows, which ``wgmma`` takes (a 32-row tile compiles to the older
      ``mma.sync``). With G gathered in the loads, its operand arrives element by
      element whatever the tile, and the 32-row tiles stay: on sizes that are not
      multiples of 16 they are the ones that do not spill.
    * sm_8x: no 128 x 256 tile with BLOCK_K = 64 (``mma.sync`` fragments of that tile
      spill in the main loop), nor with G gathered in the loads (246-255 registers under
      triton 3.6 to 3.9, a 40-byte stack frame under 3.7.1).
    * The operand ring (``num_stages`` x (A tile + B tile)) fits shared memory: ``smem``
      bytes a block may use (the device's own figure), else :data:`SHARED_LIMIT`'s.
    * fp32 through tf32 on sm_8x with triton < 3.7: tiles up to 128 x 128; the 128 x 256
      tile spills in its main loop there (41 spill instructions under triton 3.6.0, none
      under 3.8 / 3.9).

    All are read off the compiled code (tests/kernels/test_aot.py, bench/codegen.py).
    """
    kw = config.kwargs
    if dtype == torch.float32 and input_precision == "ieee":
        return kw["BLOCK_M"] * kw["BLOCK_N"] <= 64 * 64 and kw["BLOCK_K"] <= 32
    if capability[0] >= 9 and kw["BLOCK_M"] < 64 and not gather:
        return False
    if capability[0] == 8 and (kw["BLOCK_K"] >= 64 or gather) and kw["BLOCK_M"] * kw["BLOCK_N"] > 128 * 128:
        return False
    elem = 4 if dtype == torch.float32 else 2
    ring = config.num_stages * (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * elem
    limit = smem if smem is not None else SHARED_LIMIT.get(capability[0], SHARED_LIMIT[8])
    if ring > limit - 8192:
        return False
    if old_triton is None:
        old_triton = _triton_before(3, 7)
    if dtype == torch.float32 and capability[0] == 8 and old_triton:
        return kw["BLOCK_M"] * kw["BLOCK_N"] <= 128 * 128
    return True


def prune_configs(configs, named_args, **kwargs):
    """Autotune pruning by :func:`keep_config` (the first config if none is kept)."""
    g = named_args.get("g_ptr")
    dtype = getattr(g, "dtype", None)
    device = getattr(g, "device", None)
    capability = _launch.capability(device)
    smem = _launch.shared_memory_limit(device)
    kept = [
        c for c in configs
        if keep_config(
            c, dtype, kwargs.get("INPUT_PRECISION"), capability, gather=bool(kwargs.get("GATHER_G")), smem=smem
        )
    ]
    return kept or configs[:1]


#: Copy ``weight`` / ``x`` to a contiguous tensor once, before the GEMM, when their last
#: dimension is not unit-stride. The kernels accept any strides, but those operands'
#: tiles are loaded along that dimension: without a unit stride every element needs its
#: own 64-bit address and most configs spill registers (the AOT register report). G is
#: gathered along its columns anyway and is never copied: its strides cost nothing
#: (a column-major G even makes the gathers contiguous along the tokens). Tests switch
#: this off to exercise the general-stride code.
COPY_NON_UNIT_INNER = True


def _unit_inner(t: torch.Tensor) -> torch.Tensor:
    if COPY_NON_UNIT_INNER and t.shape[1] > 1 and t.stride(1) != 1:
        return t.contiguous()
    return t


_AUTOTUNE_KEY = ["M", "N", "K", "INPUT_PRECISION", "GATHER_G"]  # the autotuner adds dtypes


@functools.cache
def _autotuned(which: str):
    # Built on first use: triton.autotune touches no device, but keeping the configs in a
    # function means one list serves the autotuner, the single-config mode and the AOT tests.
    fn, cfgs = (
        (grad_input_kernel, grad_input_configs())
        if which == "grad_input"
        else (grad_weight_kernel, grad_weight_configs())
    )
    key = _AUTOTUNE_KEY + (["SPLIT"] if which == "grad_weight" else [])
    return triton.autotune(
        configs=cfgs, key=key, prune_configs_by={"early_config_prune": prune_configs}
    )(fn)


def _launch_kernel(which, kernel, grid_of, args, precision, gather, config, traceable, **constexprs):
    """Launch with ``config`` (a triton.Config), the single test config, or the autotuner."""
    if config is None and _launch.single_config_mode():
        config = (grad_input_configs if which == "grad_input" else grad_weight_configs)()[0]
    if config is not None:
        meta = dict(config.kwargs)
        _launch.launchable(kernel, traceable)[grid_of(meta)](
            *args, **meta, INPUT_PRECISION=precision, GATHER_G=gather, **constexprs,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    else:
        _launch.launchable(_autotuned(which), traceable)[grid_of](
            *args, INPUT_PRECISION=precision, GATHER_G=gather, **constexprs
        )


#: :func:`gather_columns` pads the compacted ``G[:, S]`` to a width that is a multiple of
#: this many columns (zeros after the k selected ones): its row stride and the mask of
#: the GEMMs' loads along it are then divisible by 16, which Triton needs to turn those
#: loads into asynchronous copies (cp.async / TMA) feeding the MMA. At k = 205 a
#: ``(M, 205)`` operand is loaded element by element and every wgmma waits for it.
PAD_COLUMNS = 16


def padded_width(k: int) -> int:
    """The width of :func:`gather_columns`' output for ``k`` selected columns."""
    return -(-k // PAD_COLUMNS) * PAD_COLUMNS


def gather_columns(
    grad: torch.Tensor,
    idx: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    weight_out: torch.Tensor | None = None,
    traceable: bool = False,
):
    """``grad[:, idx]`` compacted into a contiguous ``(M, padded_width(k))`` tensor whose
    columns after the first k are zeros (the GEMMs read it whole; ``[:, :k]`` is
    ``grad[:, idx]``).

    ``out``: optional preallocated result of that shape (any strides); ``traceable``:
    launch through ``torch.library.wrap_triton`` (inside a ``triton_op``).

    ``weight``: a 2-D ``(out_features, in)`` tensor of grad's dtype (any strides): the
    same launch also gathers its rows ``idx`` into a contiguous ``(padded_width(k), in)``
    tensor, the rows after the first k zeros, and the result is the pair ``(G[:, idx]
    padded, W[idx] padded)``; ``weight_out``: optional preallocated contiguous buffer for
    the second.
    """
    _launch.check_float_tensor("grad", grad, 2)
    device = grad.device
    idx = _launch.check_index("idx", idx, device)
    M, K = grad.shape[0], idx.shape[0]
    KP = padded_width(K)
    out = _launch.out_or_empty("out", out, (M, KP), grad.dtype, device)
    cfg = gather_configs()[0]
    programs = _launch.cdiv(M, cfg["BLOCK_M"]) * _launch.cdiv(KP, cfg["BLOCK_K"])
    w_args = (grad, out, 0, 0, 0)  # unused without a weight
    if weight is not None:
        _launch.check_float_tensor("weight", weight, 2)
        if weight.dtype != grad.dtype or weight.device != device:
            raise ValueError(
                f"weight must match grad ({grad.dtype} on '{device}'); got {weight.dtype} on '{weight.device}'"
            )
        NW = weight.shape[1]
        weight_out = _launch.out_or_empty("weight_out", weight_out, (KP, NW), grad.dtype, device)
        if not weight_out.is_contiguous():
            raise ValueError("weight_out must be contiguous")
        programs += _launch.cdiv(KP, cfg["W_ROWS"]) * _launch.cdiv(NW, cfg["W_COLS"])
        w_args = (weight, weight_out, NW, weight.stride(0), weight.stride(1))
    if programs > 0:
        w, w_out, NW, stride_wo, stride_wi = w_args
        _launch.launchable(gather_columns_kernel, traceable)[(programs,)](
            grad, idx, out, w, w_out, M, K, KP, NW,
            grad.stride(0), grad.stride(1), out.stride(0), out.stride(1), stride_wo, stride_wi,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], WITH_W=weight is not None,
            W_ROWS=cfg["W_ROWS"], W_COLS=cfg["W_COLS"], num_warps=cfg["num_warps"],
        )
    return out if weight is None else (out, weight_out)


def _grad_operand(grad, idx, grad_selected):
    """(G operand, GATHER_G, KA): the compacted ``grad[:, idx]`` when given (``(M, k)``,
    or :func:`gather_columns`' zero-padded ``(M, padded_width(k))``), else G itself."""
    M, K = grad.shape[0], idx.shape[0]
    if grad_selected is None:
        return grad, True, K
    widths = {K, padded_width(K)}
    if (
        grad_selected.dim() != 2 or grad_selected.shape[0] != M or grad_selected.shape[1] not in widths
        or grad_selected.dtype != grad.dtype or grad_selected.device != grad.device
    ):
        raise ValueError(
            f"grad_selected must be grad[:, idx] (shape {(M, K)}) or gather_columns' padded form "
            f"(shape {(M, padded_width(K))}), {grad.dtype} on '{grad.device}'; "
            f"got {tuple(grad_selected.shape)}, {grad_selected.dtype} on '{grad_selected.device}'"
        )
    return grad_selected, False, grad_selected.shape[1]


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
    grad_selected: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config=None,
    traceable: bool = False,
) -> torch.Tensor:
    """``grad[:, idx] @ weight[idx, :]`` without copying the selected rows of ``weight``.

    ``grad: (M, out_features)``, ``weight: (out_features, in_features)``, ``idx``: 1-D
    int64 (k >= 1 entries, valid unit indices). Returns ``(M, in_features)`` in grad's
    dtype. ``grad_selected``: the compacted ``grad[:, idx]`` from :func:`gather_columns`,
    read densely instead of gathering G's columns in the GEMM loads. ``out``: optional
    preallocated result (any strides); ``config``: force one ``triton.Config`` from
    :func:`grad_input_configs` (tests); ``traceable``: launch through
    ``torch.library.wrap_triton`` (inside a ``triton_op``).
    """
    idx = _check_operands(grad, weight, "weight", idx)
    weight = _unit_inner(weight)
    M, n_out = grad.shape
    if weight.shape[0] != n_out:
        raise ValueError(f"weight {tuple(weight.shape)} does not match grad {tuple(grad.shape)}")
    n_in = weight.shape[1]
    K = idx.shape[0]
    out = _launch.out_or_empty("out", out, (M, n_in), grad.dtype, grad.device)
    if M == 0 or n_in == 0:
        return out
    if K == 0:
        return out.zero_()

    def grid_of(meta):
        return (_launch.cdiv(M, meta["BLOCK_M"]) * _launch.cdiv(n_in, meta["BLOCK_N"]),)

    g_op, gather, KA = _grad_operand(grad, idx, grad_selected)
    args = (
        g_op, weight, idx, out, M, n_in, K, KA,
        g_op.stride(0), g_op.stride(1), weight.stride(0), weight.stride(1),
        out.stride(0), out.stride(1),
    )
    _launch_kernel(
        "grad_input", grad_input_kernel, grid_of, args, input_precision_for(grad.dtype), gather, config, traceable
    )
    return out


#: No grad_W config has a product tile larger than this (BLOCK_M x BLOCK_N; a test checks).
MAX_WEIGHT_TILE = 128 * 128
#: Tokens a split-K slice reduces over at the least.
MIN_SPLIT_TOKENS = 512
MAX_SPLIT = 16


def weight_split(M: int, K: int, n_in: int, device: torch.device) -> int:
    """Slices of the token reduction for grad_W (split-K) so that its programs fill the
    GPU: with ``K * in / MAX_WEIGHT_TILE`` product tiles at the least, enough slices for
    one program per SM whatever config the autotuner picks, each slice at least
    ``MIN_SPLIT_TOKENS`` tokens. At M = 8192, k = 205, in = 4096 on 132 SMs: 51 tiles at
    the least, 3 slices. 1 (no split) when the tiles alone fill the GPU."""
    tiles = max(1, (K * n_in) // MAX_WEIGHT_TILE)
    sms = _launch.num_sms(device)
    if tiles >= sms:
        return 1
    return max(1, min(_launch.cdiv(sms, tiles), M // MIN_SPLIT_TOKENS, MAX_SPLIT))


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
    grad_selected: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config=None,
    split: int | None = None,
    traceable: bool = False,
) -> torch.Tensor:
    """The dense ``(out_features, in_features)`` weight gradient of unified meProp.

    Rows ``idx`` hold ``grad[:, idx]^T @ x``; every other row is zero. ``grad: (M, out)``,
    ``x: (M, in)``, ``idx``: 1-D int64 of distinct unit indices; ``rest``: the other
    indices (from ``topk_indices(..., return_rest=True)``; computed here when None).
    ``idx`` and ``rest`` together must cover every row once. ``grad_selected``: the
    compacted ``grad[:, idx]`` (:func:`gather_columns`), read instead of gathering from
    G. ``out``: optional preallocated result (any strides); ``config``: force one
    ``triton.Config`` (tests); ``split``: slices of the token reduction (split-K, see
    :func:`weight_split`, the default; 1: none);
    ``traceable``: launch through ``torch.library.wrap_triton`` (inside a ``triton_op``).
    """
    idx = _check_operands(grad, x, "x", idx)
    x = _unit_inner(x)
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
    out = _launch.out_or_empty("out", out, (n_out, n_in), grad.dtype, grad.device)
    if n_out == 0 or n_in == 0:
        return out

    if split is None:
        split = weight_split(M, K, n_in, grad.device)
    split = max(1, min(int(split), max(M, 1)))
    use_ws = split > 1 and K > 0 and M > 0
    ws = torch.empty((split, K, n_in) if use_ws else (0,), dtype=torch.float32, device=grad.device)

    def grid_of(meta):
        bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
        n_tiles = _launch.cdiv(n_in, bn)
        if use_ws:
            return (_launch.cdiv(K, bm) * n_tiles * split,)
        return ((_launch.cdiv(K, bm) + _launch.cdiv(R, bm)) * n_tiles,)

    g_op, gather, KA = _grad_operand(grad, idx, grad_selected)
    args = (
        g_op, x, idx, rest, out, ws, M, n_in, K, R, KA, split,
        g_op.stride(0), g_op.stride(1), x.stride(0), x.stride(1),
        out.stride(0), out.stride(1),
    )
    _launch_kernel(
        "grad_weight", grad_weight_kernel, grid_of, args, input_precision_for(grad.dtype), gather, config,
        traceable, USE_WS=use_ws,
    )
    if use_ws:
        rc = reduce_configs()[0]
        grid = ((_launch.cdiv(K, rc["BLOCK_M"]) + _launch.cdiv(R, rc["BLOCK_M"])) * _launch.cdiv(n_in, rc["BLOCK_N"]),)
        _launch.launchable(split_reduce_kernel, traceable)[grid](
            ws, idx, rest, out, n_in, K, R, split, ws.stride(0), out.stride(0), out.stride(1),
            BLOCK_M=rc["BLOCK_M"], BLOCK_N=rc["BLOCK_N"], num_warps=rc["num_warps"],
        )
    return out
