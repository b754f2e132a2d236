"""meProp in plain torch: the CPU path and the oracle for every kernel.

Notation (the README's "Semantics"): a linear layer ``y = x W^T + b`` with the leading dims of
``x`` flattened, ``X: (M, in)``, ``W: (out, in)``, and the incoming gradient ``G: (M, out)``.

* score of output unit j: ``s_j = sum_m |G[m, j]|``, accumulated in fp32 (fp64 for fp64
  inputs); a NaN or inf score counts as +inf;
* ``S``: the k units with the largest scores, ties to the lower index, returned sorted;
* ``grad_x = G[:, S] @ W[S, :]``, ``grad_W[S, :] = G[:, S]^T @ X`` (other rows zero),
  ``grad_b = sum_m G[m, :]`` (dense and exact).

Only the k selected columns of G and rows of W are ever copied: no dense mask, no
(M x out) temporary.

Per-example top-k (``unified=False``) keeps a set ``S_m`` for each row m (the top-k of
``|G[m, :]|``, same tie and NaN rules); its products are weighted row sums
(``embedding_bag``) over the ``M * k`` selected entries. Random-k draws uniform k-subsets instead.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "column_scores",
    "select_topk",
    "unified_topk_indices",
    "unified_backward",
    "dense_backward",
    "per_example_topk_indices",
    "random_indices",
    "per_example_random_indices",
    "per_example_backward",
    "rows_to_sparse",
    "unified_sparse_backward",
    "per_example_sparse_backward",
]


_SCORE_CHUNK = 1 << 18  # elements of |G| held at once while scoring (1 MiB in fp32)


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _abs_column_sums(grad: Tensor) -> Tensor:
    """``sum_m |grad[m, j]|`` for each column j, NaN and inf left as they come."""
    M, out = grad.shape
    dtype = _score_dtype(grad.dtype)
    if grad.dtype == dtype:  # no dtype argument: the reduction is a little cheaper so
        dtype = None
    rows = max(1, _SCORE_CHUNK // max(out, 1))
    if M <= rows:
        return grad.abs().sum(0, dtype=dtype)
    # (the first block's sums start the total: under torch's older vmap a plain tensor of
    # zeros could not take a batched gradient's sums in place)
    scores = grad[:rows].abs().sum(0, dtype=dtype)
    for start in range(rows, M, rows):
        scores += grad[start : start + rows].abs().sum(0, dtype=dtype)
    return scores


def column_scores(grad: Tensor) -> Tensor:
    """``sum_m |grad[m, j]|`` for each column j of a 2-D ``grad``, NaN mapped to +inf.

    Accumulated in fp32 (fp64 for fp64 input). ``|grad|`` is taken a block of rows at a
    time, so the temporary is bounded (at most ``_SCORE_CHUNK`` elements, or one row)
    whatever M is.
    """
    return _abs_column_sums(grad).nan_to_num_(nan=math.inf, posinf=math.inf)


_legacy_batched = getattr(getattr(torch._C, "_functorch", None), "is_legacy_batchedtensor", None)


def is_legacy_batched(t: Tensor) -> bool:
    """Whether ``t`` is a batched tensor of torch's older vmap, which runs the backward of
    ``autograd.grad(..., is_grads_batched=True)`` and of ``jacobian`` / ``hessian``
    with ``vectorize=True``: it has no storage to read on the host, and
    ``_are_functorch_transforms_active()`` does not report it."""
    # (dynamo cannot trace the check, and what it compiles is never such a tensor)
    return _legacy_batched is not None and not torch.compiler.is_compiling() and _legacy_batched(t)


def refuse_legacy_batched(layer: str, what: str | None) -> None:
    """Raise for a setting that cannot run under torch's older vmap (``what``: it; ``""``:
    the layer cannot at all; None: it can)."""
    if what is not None:
        # torch.func.vmap runs random selection (with its randomness argument) and the
        # selection counters; not sparse gradients, nor MePropLSTM
        func_ok = what in ("selection='random'", "track_selection=True")
        raise NotImplementedError(
            f"{layer}{' with ' + what if what else ''} cannot run a batched backward (autograd.grad(..., "
            f"is_grads_batched=True), or jacobian / hessian with vectorize=True); use "
            f"vectorize=False or a loop over the grad_outputs" + (", or torch.func.vmap" if func_ok else "")
        )


_LAZY_ZEROS_BYTES = 32 << 20  # glibc serves blocks this large from fresh mmap'd pages


def _weight_grad_zeros(shape, like: Tensor) -> Tensor:
    """Zeros for a dense weight gradient of which meProp writes only k rows.

    On a CPU a large block comes from ``calloc`` (through numpy): the operating system
    maps zero pages lazily, so rows that are never written cost nothing inside the
    backward, where ``torch.zeros`` would fault in and clear every page of the
    (out x in) matrix (about 20 ms for 4096 x 4096 fp32 on a 2-core machine). Smaller
    blocks use ``torch.zeros``: there the allocator usually recycles memory, and when a
    ``calloc`` block does come from fresh pages the faults only move to the optimizer's
    first read of the gradient (measured in a 784-500-500-10 Adam training loop: no
    saving, and sometimes 1000 extra faults per step in Adam).
    """
    numel = math.prod(shape)
    nbytes = numel * like.element_size()
    if nbytes < _LAZY_ZEROS_BYTES or not _numpy_may_read(like):
        # (not a plain CPU tensor, or one traced or transformed: torch's older vmap would
        # refuse to copy its batched rows into the plain tensor numpy makes)
        return like.new_zeros(shape)
    raw = np.zeros(nbytes, dtype=np.uint8)
    return torch.from_numpy(raw).view(like.dtype).view(shape)


def select_topk(scores: Tensor, k: int, *, sort: bool = True) -> Tensor:
    """Indices of the ``k`` largest ``scores``, ties to the lower index, NaN counted as
    +inf, sorted ascending (``sort=False``: the same set in an unspecified but
    deterministic order, one operation fewer; the CPU backward takes it so).

    The definition is a stable descending sort, which keeps equal scores in index
    order, so the lower index wins every tie. On a CPU ``topk`` finds the same set in a
    fraction of the time (a full sort of MNIST's 500 scores costs about twice as much
    inside a training step); its choice among equal values is unspecified, so it is
    kept only when the k-th and (k+1)-th largest scores differ and the largest is
    finite (``topk`` ranks NaN above inf, and both must count as +inf, in index
    order); the stable sort decides otherwise. ``scores`` is not modified.
    """
    n = scores.shape[0]
    if scores.device.type == "cpu" and k < n and not torch.compiler.is_compiling() and not is_legacy_batched(scores):
        values, idx = torch.topk(scores, k + 1)  # descending
        values = values.tolist()
        # NaN != NaN, so a NaN in the top k+1 would pass the tie test: the finiteness
        # test on the largest (NaN and inf rank first) sends those to the sort.
        if values[k - 1] != values[k] and math.isfinite(values[0]):
            idx = idx.narrow(0, 0, k)
            return idx.sort().values if sort else idx
    scores = torch.nan_to_num(scores, nan=math.inf, posinf=math.inf, neginf=-math.inf)
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return order.sort().values if sort else order


def unified_topk_indices(grad: Tensor, k: int, *, sort: bool = True) -> Tensor:
    """The unified top-k set S of a 2-D gradient ``grad: (M, out)`` (see
    :func:`select_topk` for ``sort``)."""
    return select_topk(_abs_column_sums(grad), k, sort=sort)


def unified_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    idx: Tensor,
    *,
    need_input: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
):
    """meProp gradients for the selected output units ``idx``.

    ``grad: (M, out)``, ``x: (M, in)``, ``weight: (out, in)``, ``idx: (k,)`` int64.
    Returns ``(grad_x, grad_W, grad_b)``; an entry is None where it was not asked for.
    """
    g_s = grad.index_select(1, idx)  # (M, k): the only copy of G
    grad_x = grad_w = grad_b = None
    if need_input:
        grad_x = g_s @ weight.index_select(0, idx)
    if need_weight:
        grad_w = _weight_grad_zeros(weight.shape, grad)
        grad_w.index_copy_(0, idx, g_s.t() @ x)
    if need_bias:
        grad_b = grad.sum(0)
    return grad_x, grad_w, grad_b


def dense_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    *,
    need_input: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
):
    """The ordinary linear-layer gradients (what meProp gives for ``k >= out``)."""
    grad_x = grad @ weight if need_input else None
    grad_w = grad.t() @ x if need_weight else None
    grad_b = grad.sum(0) if need_bias else None
    return grad_x, grad_w, grad_b


# --- per-example and random selection -------------------------------------------------


def per_example_topk_indices(grad: Tensor, k: int, *, sort: bool = True) -> Tensor:
    """``(M, k)`` int64: for each row of ``grad`` the k largest ``|grad[m, :]|``, sorted
    ascending (``sort=False``: the same sets, in an unspecified but deterministic order;
    the backward takes them so, one operation fewer).

    Ties go to the lower index; NaN and inf count as +inf. For fp32/fp16/bf16 each
    ``|g|`` (exact in fp32) is packed with its reversed column index into a unique int64
    key, so ``topk`` has no ties to break; fp64 uses a stable sort.
    """
    M, out = grad.shape
    if grad.dtype == torch.float64 or is_legacy_batched(grad):  # (torch's older vmap cannot view bits)
        a = grad.abs().nan_to_num_(nan=math.inf, posinf=math.inf)
        idx = torch.sort(a, dim=1, descending=True, stable=True).indices[:, :k]
        return idx.sort(dim=1).values if sort else idx
    a = grad.abs()
    if a.dtype != torch.float32:
        a = a.float()
    a.nan_to_num_(nan=math.inf, posinf=math.inf)
    return _row_topk_of_nonnegative(a, k, sort)


def _row_topk_of_nonnegative(a: Tensor, k: int, sort: bool) -> Tensor:
    """``(M, k)``: each row's k largest entries of an fp32 ``a: (M, out)`` with no NaN and
    no negative value, ties to the lower index; sorted ascending (``sort=False``: an
    unspecified but deterministic order).

    Each value is packed with its reversed column index into a unique int64 key
    (non-negative floats order like their bit patterns read as integers), so the set
    is the same whatever finds it."""
    idx = _numpy_row_topk(a, k)
    if idx is not None:
        return idx
    idx = torch.topk(_packed_row_keys(a), k, dim=1, sorted=False).indices
    return idx.sort(dim=1).values if sort else idx


def _packed_row_keys(a: Tensor) -> Tensor:
    """``(a's bits << 32) | (out - 1 - column)`` as a fresh contiguous int64 tensor: for
    non-negative fp32 ``a`` the keys order as the values, ties to the lower column."""
    key = a.view(torch.int32).to(torch.int64, memory_format=torch.contiguous_format).bitwise_left_shift_(32)
    return key.bitwise_or_(torch.arange(a.shape[1] - 1, -1, -1, device=a.device))


def _numpy_row_topk(a: Tensor, k: int) -> Tensor | None:
    """:func:`_row_topk_of_nonnegative` by numpy, sorted and contiguous, where that is
    the faster route (an fp32 ``a`` on which :func:`_numpy_may_read`, k over 1/64 of
    the units); else None.

    torch's CPU ``topk`` copies each row into (value, index) pairs and selects on them:
    with a partial sort where ``64 * k <= out`` (quick for so small a k at MNIST's
    sizes), else with ``nth_element``, about 2.3 us a row of 500 (115 us for an MNIST
    layer's 50 x 500 at k = 20 on a 2-core Xeon VM). numpy's in-place ``partition`` of
    the same int64 keys takes 30 us there, with its SIMD selection (x86 with AVX2 or
    AVX-512; without them about as slow as torch). The indices come back sorted:
    numpy's order within the top k may depend on the CPU's vector width, and the order
    is the order a backward sums in.
    """
    M, out = a.shape
    if not (out < 64 * k and k < out and a.dtype == torch.float32 and _numpy_may_read(a)):
        return None
    keys = _packed_row_keys(a).numpy()  # a fresh array: partitioned in place
    keys.partition(out - k, axis=1)
    cols = (out - 1) - (keys[:, out - k :] & 0xFFFFFFFF)
    cols.sort(axis=1)
    return torch.from_numpy(cols)


def random_indices(out: int, k: int, *, generator=None, device=None) -> Tensor:
    """A uniform random k-subset of ``range(out)``, sorted (unified random-k)."""
    perm = torch.randperm(out, generator=generator, device=device)
    return perm[:k].sort().values


def per_example_random_indices(
    M: int, out: int, k: int, *, generator=None, device=None, sort: bool = True
) -> Tensor:
    """``(M, k)``: an independent uniform random k-subset of ``range(out)`` per row, sorted
    (``sort=False``: in an unspecified order)."""
    keys = torch.rand(M, out, generator=generator, device=device)
    idx = _numpy_row_topk(keys, k)  # (the same set as topk's but where two draws tie)
    if idx is not None:
        return idx
    idx = torch.topk(keys, k, dim=1, sorted=False).indices
    return idx.sort(dim=1).values if sort else idx


def _pairs_by_unit(idx: Tensor, n_units: int):
    """The ``M * k`` selected (row m, unit j) pairs of an ``(M, k)`` selection (each row's
    units distinct, in any order, all below ``n_units``), grouped by unit: ``units`` (j of
    each pair, ascending), ``rows`` (m of each pair, ascending within a unit) and
    ``order`` (the pairs' flat positions ``m * k + slot``)."""
    k = idx.shape[1]
    flat = idx.reshape(-1)
    order = _stable_order(flat, n_units)
    return flat.index_select(0, order), order.div(k, rounding_mode="floor"), order


def _numpy_may_read(t: Tensor) -> bool:
    """Whether a host-side numpy routine may stand in for torch ops on ``t``: a plain CPU
    tensor outside any tracing, transform or dispatch mode (``make_fx`` would record
    numpy's result as a constant, a ``FlopCounterMode`` would not see it, and torch's
    older vmap's batched tensors have no storage to read)."""
    return (
        t.device.type == "cpu" and type(t) is torch.Tensor and not torch.compiler.is_compiling()
        and not is_legacy_batched(t) and not torch.jit.is_tracing()
        and not torch._C._are_functorch_transforms_active() and torch._C._len_torch_dispatch_stack() == 0
    )


_RADIX_SORT_MIN = 32768  # torch's CPU sort: a radix sort for integers from this many on


def _stable_order(units: Tensor, n_units: int) -> Tensor:
    """``argsort(units, stable=True)`` for a 1-D int64 tensor of unit numbers in
    ``[0, n_units)``.

    The same permutation as a stable sort of the int64 values, faster: a stable sort
    needs only the unit numbers' own width. Below 32,768 elements torch's CPU sort is a
    comparison sort (257 us for the 4,000 pairs of an MNIST layer on a 2-core VM), where
    numpy's stable argsort of 16-bit integers is a radix sort (42 us); from there on
    torch radix-sorts integers, in fewer passes for int16 than for int64 (486 against
    1,663 us for 52,480 pairs). numpy only where :func:`_numpy_may_read`.
    """
    narrow = n_units <= 1 << 15
    if narrow and units.numel() < _RADIX_SORT_MIN and _numpy_may_read(units):
        return torch.from_numpy(np.argsort(units.numpy().astype(np.int16), kind="stable"))
    if narrow:
        units = units.to(torch.int16)
    elif n_units <= 1 << 31:
        units = units.to(torch.int32)
    return torch.sort(units, stable=True).indices


def _bag_sums(rows: Tensor, table: Tensor, offsets: Tensor, weights: Tensor) -> Tensor:
    """``out[b] = sum_i weights[i] * table[rows[i]]`` over bag b's slice of ``rows``
    (bags start at ``offsets``; an empty bag gives zeros; ``offsets`` None: ``rows`` is
    2-D, one bag per row): one ``embedding_bag`` call, summed in order, so the result is
    deterministic. The op itself, not ``F.embedding_bag``, whose checks cost about 20 us
    a call. (Detaching a table that requires grad would save the op's training variant
    another 10-15 us under no_grad, but would also drop a forward-mode tangent.)"""
    if weights.dtype != table.dtype:
        weights = weights.to(table.dtype)
    if offsets is None:
        offsets = torch.arange(0, rows.numel(), rows.shape[1], device=rows.device)
        rows, weights = rows.reshape(-1), weights.reshape(-1)
    # (table, indices, offsets, scale_grad_by_freq, mode 0 = sum, sparse,
    #  per_sample_weights, include_last_offset, padding_idx: None, as F.embedding_bag
    #  passes it; -1 would mean the table's last row)
    return torch.embedding_bag(table, rows, offsets, False, 0, False, weights, False, None)[0]


def _masked_gemm_pays(M: int, k: int, out: int) -> bool:
    """Whether the per-example products run faster as two dense GEMMs on a masked copy
    of G (all but the kept entries zero) than as row sums over the ``M * k`` entries.

    Row sums cost about ``M * k * in`` reads, the GEMMs a dense backward whatever k is.
    Measured on a 2-core CPU (fp32, products only): at 256 x 4096->4096 the row sums take
    34 / 103 / 160 / 239 ms at k = 2 / 10 / 15 / 25 % against 115-130 ms for the GEMMs;
    at 50 x 784->500 they win up to k = 25 % (0.52 against 0.70 ms). Only above 1/8 of
    the units (1/4 for a small batch) is the masked (M x out) copy made.

    The crossover depends on the CPU: on an Intel Xeon VM (AVX-512, 2 cores) the GEMMs
    win from about 10 % at 50 x 784->500 (row sums 514 us against 366 us at k = 80) and
    between 5 and 10 % at 256 x 4096->4096 (62 and 89 ms against 77 ms). The rule is one
    fixed function of the shape, so that a backward's numbers (the two routes round
    differently) never depend on a timing or on the machine's vector width.
    """
    return k * (8 if M >= 128 else 4) > out


def per_example_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    idx: Tensor,
    *,
    need_input: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
):
    """Per-example meProp gradients for the ``(M, k)`` selection ``idx``.

    ``grad_x[m] = sum_{j in S_m} G[m, j] W[j, :]``;
    ``grad_W[j, :] = sum_{m: j in S_m} G[m, j] X[m, :]`` (rows never selected are zero);
    ``grad_b = sum_m G[m, :]``. Both products are weighted row sums over the ``M * k``
    kept entries (``embedding_bag``): grad_x with one bag per example (its k rows of W),
    grad_W with one bag per unit (the rows of X that selected it, in ascending order).
    Nothing of size ``M * k * in`` or ``M * out`` beyond G itself is made, except
    where k is a large share of the units (:func:`_masked_gemm_pays`): there the products
    are the two dense GEMMs on a copy of G with the unkept entries zeroed.
    """
    M, out = grad.shape
    grad_b = grad.sum(0) if need_bias else None
    if not (need_input or need_weight):
        return None, None, grad_b
    vals = grad.gather(1, idx)
    grad_x = grad_w = None
    # (torch's older vmap cannot run the row sums' grouping: an internal assert in its
    # fallback for indexing; the masked GEMMs batch.)
    if _masked_gemm_pays(M, idx.shape[1], out) or is_legacy_batched(grad):
        masked = torch.zeros_like(grad).scatter_(1, idx, vals)
        grad_x = masked @ weight if need_input else None
        grad_w = masked.t() @ x if need_weight else None
        return grad_x, grad_w, grad_b
    if need_input:
        grad_x = _bag_sums(idx, weight, None, vals)
    if need_weight:
        units, rows, order = _pairs_by_unit(idx, out)
        offsets = torch.searchsorted(units, torch.arange(out, device=units.device))
        grad_w = _bag_sums(rows, x, offsets, vals.reshape(-1)[order])
    return grad_x, grad_w, grad_b


# --- row-sparse gradients (sparse_grad=True) ------------------------------------------


def rows_to_sparse(rows: Tensor, values: Tensor, n_rows: int) -> Tensor:
    """A sparse COO tensor of shape ``(n_rows, *values.shape[1:])`` holding ``values[i]``
    at row ``rows[i]`` (``rows`` sorted and unique), the layout of an
    ``nn.Embedding(sparse=True)`` gradient that SGD, Adagrad and SparseAdam take.

    ``torch.compile`` cannot trace the construction of a sparse tensor: there the
    layer's Function runs eagerly (a graph break), and ``fullgraph=True`` fails with
    the reason below rather than a tracer's internal message."""
    dynamo = getattr(torch, "_dynamo", None)  # imported wherever torch.compile traces
    if dynamo is not None and torch.compiler.is_compiling():
        dynamo.graph_break(
            msg="sparse_grad=True: torch.compile cannot trace building a sparse gradient, so a "
            "sparse_grad=True layer runs outside the graph; compile without fullgraph=True, "
            "or use sparse_grad=False"
        )
    return torch.sparse_coo_tensor(
        rows.unsqueeze(0),
        values,
        (n_rows, *values.shape[1:]),
        is_coalesced=True,
        check_invariants=False,
    )


def unified_sparse_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    idx: Tensor,
    *,
    need_input: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
):
    """meProp gradients for units ``idx`` with row-sparse weight and bias gradients.

    ``grad_W`` is a sparse COO tensor holding only the rows in ``idx`` (``G[:, S]^T X``);
    ``grad_b`` holds the same rows of the exact bias gradient, ``sum_m G[m, S]``, so that
    one sparse optimizer can own both. No (out x in) tensor is made.
    """
    g_s = grad.index_select(1, idx)
    grad_x = grad_w = grad_b = None
    if need_input:
        grad_x = g_s @ weight.index_select(0, idx)
    if need_weight:
        grad_w = rows_to_sparse(idx, g_s.t() @ x, weight.shape[0])
    if need_bias:
        grad_b = rows_to_sparse(idx, g_s.sum(0), weight.shape[0])
    return grad_x, grad_w, grad_b


def kept_row_sums(idx: Tensor, vals: Tensor | None, tables, n_units: int) -> tuple:
    """For an ``(M, k)`` selection ``idx`` (each row's units distinct, all below
    ``n_units``) with values ``vals``: ``(units, sums)``, the units some row kept
    (ascending) and, per table ``x`` of ``tables``, ``sums[i][u] = sum over (m, j) with
    idx[m, j] == units[u] of vals[m, j] * x[m]``: the kept rows of a per-row meProp
    weight gradient, no others."""
    pair_units, rows, order = _pairs_by_unit(idx, n_units)
    units = torch.unique_consecutive(pair_units)
    if not tables:
        return units, []
    offsets = torch.searchsorted(pair_units, units)
    w = vals.reshape(-1)[order]
    return units, [_bag_sums(rows, x, offsets, w) for x in tables]


def per_example_sparse_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    idx: Tensor,
    *,
    need_input: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
):
    """Per-example meProp with row-sparse weight and bias gradients.

    The rows kept are the units some example selected (the union of the ``S_m``); the
    weight rows are the per-unit bag sums of :func:`per_example_backward` over those
    units only, the bias rows are the exact bias gradient's.
    """
    M, out = grad.shape
    grad_x = grad_w = grad_b = None
    if need_input:
        grad_x = per_example_backward(
            grad, x, weight, idx, need_input=True, need_weight=False, need_bias=False
        )[0]
    if need_weight or need_bias:
        units, sums = kept_row_sums(
            idx, grad.gather(1, idx) if need_weight else None, [x] if need_weight else [], out
        )
    if need_weight:
        grad_w = rows_to_sparse(units, sums[0], out)
    if need_bias:
        grad_b = rows_to_sparse(units, grad.index_select(1, units).sum(0), out)
    return grad_x, grad_w, grad_b


def dense_sparse_backward(grad: Tensor, x: Tensor, weight: Tensor, **flags):
    """``k >= out`` with ``sparse_grad=True``: the dense gradients, every row kept, in the
    sparse layout (an optimizer that takes sparse gradients keeps getting them)."""
    gx, gw, gb = dense_backward(grad, x, weight, **flags)
    every = torch.arange(weight.shape[0], device=grad.device)
    gw = rows_to_sparse(every, gw, weight.shape[0]) if gw is not None else None
    gb = rows_to_sparse(every, gb, weight.shape[0]) if gb is not None else None
    return gx, gw, gb
