"""The Triton meProp backwards as ``torch.library`` custom ops.

``unified_topk_backward`` (unified top-k), ``per_example_topk_backward`` (per-example
top-k), ``per_example_backward_from_indices`` and ``unified_backward_from_indices``
(a selection drawn by the caller: random-k) -- each ``torch.ops.meprop_triton.<name>``.

Each is a ``torch.library.triton_op``: its kernel launches go through ``wrap_triton``,
so ``torch.compile`` traces through it and keeps one graph on a GPU, while eager calls
launch the kernels directly. Under Triton's interpreter (CPU tensors) each is an opaque
custom op with a fake implementation instead, since interpreted kernels cannot be traced.

Importing this module imports triton and the kernel modules (and registers the ops); it
touches no CUDA. ``meprop_triton`` never imports it at package import: callers import it
lazily, when the Triton backend is used.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import triton_op

from . import conv1d as _conv1d
from .kernels import _launch
from .kernels import scores as _scores
from .kernels.matmul import gather_columns, gathered_grad_input, scattered_grad_weight
from .kernels.per_example import gathered_rows_grad_input, row_topk_indices, sorted_pairs_grad_weight
from .kernels.scores import column_score_parts, column_scores_and_bias
from .kernels.topk import MAX_FROM_PARTS, topk_from_parts, topk_indices

__all__ = [
    "unified_topk_backward",
    "per_example_topk_backward",
    "per_example_backward_from_indices",
    "unified_backward_from_indices",
]

OP_NAME = "meprop_triton::unified_topk_backward"

#: Read ``G[:, S]`` once into a dense ``(M, k)`` tensor, padded with zero columns to a
#: multiple of 16 (one gather kernel), that both GEMMs then read densely with
#: asynchronous copies (True), or gather G's selected columns inside each GEMM's loads
#: (False: no temporary, but element-by-element operand loads). Measured on an H200
#: (bench/results/gpu-h200-2026-12-04, bf16, M = 8192, in = out = 4096): the compacted
#: route was 1.4x (k = 1 %), 2.1x (5 %), 2.4x (10 %) and 3.1x (25 %) faster. With a
#: row-major G each gathered element costs its own 32-byte sector, re-read once per
#: output column tile (in / BLOCK_N times per GEMM), against one compaction pass.
COMPACT_GRAD = True

#: How the two products of a unified backward run once ``G[:, S]`` is compacted:
#:
#: * ``"cublas"``: ``torch.mm`` on the compacted operands, cuBLAS on a GPU (torch's CPU
#:   matmul under the interpreter). ``grad_x = G[:, S] @ W[S, :]`` with ``W[S, :]``
#:   copied once into a ``(k, in)`` tensor (zero rows up to the padded width) by the
#:   launch that compacts ``G[:, S]``; ``grad_W[S] = G[:, S]^T @ X`` into a ``(k, in)``
#:   tensor and ``index_copy_`` of those rows into ``grad_W``, which the top-k launch has
#:   zero-filled by programs beside its one selecting program (up to 16,384 units; on
#:   the SMs the selection leaves idle: no pass of its own). Small temporaries only:
#:   ``(k, in)`` twice, nothing of size ``(M, out)``. The products are torch's own, as in
#:   the dense ``nn.Linear`` backward: tf32 for fp32 where torch allows it, and in fp16 /
#:   bf16 a reduction that cuBLAS may carry out in reduced precision where torch allows
#:   it (``torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction`` and its
#:   fp16 twin).
#: * ``"triton"``: kernels/matmul.py's GEMMs, which gather ``W``'s rows in their loads
#:   and store ``grad_W``'s rows (zeros included) themselves.
#:
#: ``"auto"`` takes cuBLAS. Measured on an H200 (bench/results/gpu-h200-2026-12-04,
#: bf16, M = 8192, in = out = 4096, k = 205), the Triton GEMMs took 65 us (grad_x) and
#: 46 + 16 us (grad_W and its split-K sum): about 210 and 220 TFLOP/s of useful work,
#: where cuBLAS ran the dense backward's two GEMMs at about 740 TFLOP/s, and at k = 50 %
#: the whole Triton backward (738 us) was no faster than the dense one (728 us) with half
#: its FLOPs. Each launch through Triton's Python launcher also cost far more host time
#: there than a torch op. ``bench/test_bench_backward.py::test_triton_gemm_routes``
#: times the two routes side by side.
UNIFIED_GEMMS = "auto"


def unified_gemm_route() -> str:
    """``"cublas"`` or ``"triton"``: the route :data:`UNIFIED_GEMMS` asks for."""
    if UNIFIED_GEMMS == "auto":
        return "cublas"
    if UNIFIED_GEMMS not in ("cublas", "triton"):
        raise ValueError(f"triton_ops.UNIFIED_GEMMS must be 'auto', 'cublas' or 'triton'; got {UNIFIED_GEMMS!r}")
    return UNIFIED_GEMMS


def _no_indices(grad: Tensor) -> Tensor:
    return grad.new_empty(0, dtype=torch.int64)


def select_units(grad: Tensor, k: int, *, return_rest: bool = False, traceable: bool = True, zero=None):
    """``(idx, rest, grad_b)``: the unified top-k units of a 2-D ``grad`` (ascending; and
    the others, ascending, with ``return_rest``, else None) and the bias gradient
    ``grad.sum(0)``, from the kernels. Up to ``MAX_FROM_PARTS`` units the top-k program
    finishes the scores' row slices itself (one launch fewer than
    ``scores.finish_kernel`` then ``topk_indices``, the same bits). ``traceable``: the
    launches go through ``wrap_triton`` (inside a ``triton_op``; False for direct calls).
    ``zero``: a contiguous tensor filled with zeros on the way, by programs beside the
    one that selects (on SMs it leaves idle; above ``topk.MAX_RESIDENT`` units, where
    several programs select, by ``zero_()``)."""
    M, n_out = grad.shape
    if M > 0 and n_out <= MAX_FROM_PARTS:
        grad_b = grad.new_empty(n_out)
        parts = column_score_parts(grad, traceable=traceable)
        sel = topk_from_parts(parts, k, grad_b, return_rest=return_rest, traceable=traceable, zero=zero)
    else:
        scores, grad_b = column_scores_and_bias(grad, traceable=traceable)
        sel = topk_indices(scores, k, return_rest=return_rest, traceable=traceable, zero=zero)
    idx, rest = sel if return_rest else (sel, None)
    return idx, rest, grad_b


def _unified_topk_backward(
    grad: Tensor, x: Tensor, weight: Tensor, k: int, need_x: bool, need_w: bool, need_b: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # Outputs that were not asked for come back as empty tensors (a custom op cannot
    # return None); unified_topk_backward turns them into None. The fourth output is the
    # selected set S (k,) ascending, empty when neither grad_x nor grad_W was asked for.
    if need_x or need_w:
        route = unified_gemm_route()
        # the cuBLAS route's grad_W: zero-filled beside the selection, its k rows copied in later
        grad_w = grad.new_empty(weight.shape) if route == "cublas" and need_w else None
        idx, rest, grad_b = select_units(grad, k, return_rest=route == "triton", zero=grad_w)
        grad_x, grad_w = _unified_products(route, grad, x, weight, idx, rest, need_x, need_w, grad_w)
    else:
        grad_x, grad_w, idx = grad.new_empty(0), grad.new_empty(0), _no_indices(grad)  # outputs may not alias
        grad_b = column_scores_and_bias(grad, traceable=True)[1] if need_b else grad.new_empty(0)
    if not need_b:
        grad_b = grad.new_empty(0)
    return grad_x, grad_w, grad_b, idx


def _unified_products(route, grad, x, weight, idx, rest, need_x, need_w, zeros=None):
    """``(grad_x, grad_W)`` for the ascending selection ``idx`` (``rest``: the other
    units, ascending; the Triton route's zero rows), empty where not needed. ``zeros``:
    the cuBLAS route's grad_W, already zero-filled (else it allocates one)."""
    if route == "cublas":
        return _cublas_products(grad, x, weight, idx, need_x, need_w, grad_w=zeros)
    g_sel = gather_columns(grad, idx, traceable=True) if COMPACT_GRAD else None
    grad_x = (
        gathered_grad_input(grad, weight, idx, grad_selected=g_sel, traceable=True)
        if need_x
        else grad.new_empty(0)
    )
    grad_w = (
        scattered_grad_weight(grad, x, idx, rest, grad_selected=g_sel, traceable=True)
        if need_w
        else grad.new_empty(0)
    )
    return grad_x, grad_w


def _cublas_products(grad, x, weight, idx, need_x, need_w, grad_w=None, compacted=None):
    """The ``"cublas"`` route of :data:`UNIFIED_GEMMS`. One launch compacts ``G[:, S]``
    and, for grad_x, gathers ``W[S, :]``, each zero-padded to a multiple of 16 units
    (``gather_columns``), so both products have an aligned reduction width (the padding
    adds exact zeros, even where W holds inf or NaN elsewhere). ``compacted``: that
    pair, already made (bench/kernel_sweep.py). ``grad_w``: a zero-filled
    ``(out, in)`` tensor to copy grad_W's k rows into (else one is made)."""
    k = idx.shape[0]
    if compacted is None:
        got = gather_columns(grad, idx, weight=weight if need_x else None, traceable=True)
        compacted = got if need_x else (got, None)
    g_sel, w_sel = compacted  # (M, kp), (kp, in)
    grad_x = torch.mm(g_sel, w_sel) if need_x else grad.new_empty(0)
    if need_w:
        rows = torch.mm(g_sel.t(), x)  # (kp, in); rows past k are the padding's zeros
        if grad_w is None:
            grad_w = grad.new_zeros(weight.shape)  # grad's dtype, as the fake and the Triton route
        grad_w.index_copy_(0, idx, rows[:k])
    else:
        grad_w = grad.new_empty(0)
    return grad_x, grad_w


def _fake_unified_topk_backward(grad, x, weight, k, need_x, need_w, need_b):
    M, n_out = grad.shape
    n_in = weight.shape[1]
    return (
        grad.new_empty((M, n_in)) if need_x else grad.new_empty(0),
        grad.new_empty((n_out, n_in)) if need_w else grad.new_empty(0),
        grad.new_empty((n_out,)) if need_b else grad.new_empty(0),
        grad.new_empty((k,) if (need_x or need_w) else (0,), dtype=torch.int64),
    )


#: True when the kernels were built for Triton's interpreter (TRITON_INTERPRET=1 when
#: triton was imported). wrap_triton cannot trace interpreted kernels, so there the op is
#: an opaque custom op with a fake implementation (torch.compile keeps it as one node);
#: otherwise it is a triton_op, which torch.compile traces into.
INTERPRETED = _launch.is_interpreted(_scores.partial_kernel)


def _register(name, fn, fake):
    """A triton_op (compiled kernels) or, under the interpreter, a custom op with a fake."""
    if INTERPRETED:
        op = torch.library.custom_op(name, mutates_args=())(fn)
        op.register_fake(fake)
        return op
    return triton_op(name, mutates_args=())(fn)


_op = _register(OP_NAME, _unified_topk_backward, _fake_unified_topk_backward)

try:  # what a triton_op's own eager kernel runs its body under: launches go straight to Triton
    from torch._library.triton import set_wrap_triton_enabled as _set_wrap_triton_enabled
except ImportError:  # pragma: no cover - a torch laid out otherwise: always dispatch
    _set_wrap_triton_enabled = None


def call_op(name: str, body, args: tuple, tensors: tuple):
    """``torch.ops.meprop_triton.<name>(*args)``, or in plain eager mode its body itself.

    The dispatcher's round trip into a Python custom op costs about 19 us of host time
    (72 against 91 us for a whole backward, measured on an idle 2-core CPU with the
    launches stubbed out), next to ~80 us of GPU work at the target shape. So when
    nothing could tell the two apart, the body runs directly, as the op's own eager
    kernel runs it (``wrap_triton`` off: each launch goes to Triton at once). The op is
    still called whenever something would see or treat it as one op: compiling, JIT
    tracing, a torch.func transform, a ``TorchDispatchMode`` or ``TorchFunctionMode``
    (``with torch.device(...)`` included), tensors other than plain ones and Parameters
    (subclasses, meta tensors), or grad mode with an input that requires grad (the op
    records no autograd history and refuses a backward through itself; the body would
    record a partial one). Under the profiler the direct call shows as one
    ``record_function`` range named after the op.
    """
    if (
        _set_wrap_triton_enabled is None
        or torch.compiler.is_compiling()
        or torch._C._get_tracing_state() is not None
        or torch._C._are_functorch_transforms_active()
        or torch._C._len_torch_dispatch_stack() != 0
        or torch._C._is_torch_function_mode_enabled()
        or any(type(t) not in _PLAIN or t.is_meta for t in tensors)
        or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
    ):
        return getattr(torch.ops.meprop_triton, name)(*args)
    with _set_wrap_triton_enabled(False):
        if torch.autograd._profiler_enabled():
            with torch.autograd.profiler.record_function(f"meprop_triton::{name}"):
                return body(*args)
        return body(*args)


#: The tensor types ``call_op`` may run a body directly on: a saved weight comes back
#: from ``ctx.saved_tensors`` as the Parameter it is.
_PLAIN = (Tensor, torch.nn.Parameter)


def unified_topk_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    k: int,
    need_x: bool = True,
    need_w: bool = True,
    need_b: bool = True,
    return_indices: bool = False,
):
    """Unified top-k meProp gradients of ``y = x W^T + b`` with the Triton kernels.

    Args:
        grad: ``(M, out)`` incoming gradient (any strides), fp32 / fp16 / bf16.
        x: ``(M, in)`` saved input (any strides), same dtype and device.
        weight: ``(out, in)``, same dtype and device.
        k: units kept, an int in ``[1, out]`` (``k = out`` gives the dense gradients).
        need_x, need_w, need_b: which gradients to compute.

    Returns ``(grad_x (M, in), grad_W (out, in), grad_b (out,))`` in grad's dtype, None
    where not asked for; with ``return_indices=True`` also the selected units ``(k,)``
    int64 ascending (empty when neither grad_x nor grad_W was asked for). The selection
    is the reference's exactly (scores ``sum |G|`` in fp32, NaN/inf as +inf, ties to the
    lower index); ``grad_b = grad.sum(0)`` is dense.
    CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1`` set before triton was
    first imported.
    """
    if grad.dim() != 2 or x.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"grad, x and weight must be 2-D; got {tuple(grad.shape)}, {tuple(x.shape)}, "
            f"{tuple(weight.shape)}"
        )
    M, n_out = grad.shape
    if tuple(weight.shape) != (n_out, x.shape[1]) or x.shape[0] != M:
        raise ValueError(
            f"shapes do not fit y = x W^T: grad {tuple(grad.shape)}, x {tuple(x.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    k = int(k)
    if not 1 <= k <= n_out:
        raise ValueError(f"k must lie in [1, out_features={n_out}]; got {k}")
    _check_operand_types(grad, x, weight, need_x, need_w)
    gx, gw, gb, idx = call_op(
        "unified_topk_backward", _unified_topk_backward,
        (grad, x, weight, k, bool(need_x), bool(need_w), bool(need_b)), (grad, x, weight),
    )
    outs = (gx if need_x else None, gw if need_w else None, gb if need_b else None)
    return (*outs, idx) if return_indices else outs


# --- per-example top-k and given selections (random-k) ---------------------------------
#
# Three more ops in the same style. ``per_example_topk_backward`` selects per row with
# kernels/per_example.py and runs its gather / sorted-scatter products;
# ``per_example_backward_from_indices`` runs those products for a given (M, k) selection
# (per-example random-k); ``unified_backward_from_indices`` runs the unified compacted
# GEMMs (kernels/matmul.py) for a given selection of k units (unified random-k). The
# selections are drawn by the caller (reference.random_indices /
# reference.per_example_random_indices on the tensors' device), so the torch and Triton
# paths draw the same units from the same generator state.

PER_EXAMPLE_OP_NAME = "meprop_triton::per_example_topk_backward"
PER_EXAMPLE_IDX_OP_NAME = "meprop_triton::per_example_backward_from_indices"
UNIFIED_IDX_OP_NAME = "meprop_triton::unified_backward_from_indices"


def _bias_only(grad: Tensor, need_b: bool) -> Tensor:
    return column_scores_and_bias(grad, traceable=True)[1] if need_b else grad.new_empty(0)


def _per_example_products(
    grad: Tensor, x: Tensor, weight: Tensor, idx: Tensor, need_x: bool, need_w: bool, need_b: bool
) -> tuple[Tensor, Tensor, Tensor]:
    grad_x = gathered_rows_grad_input(grad, weight, idx, traceable=True) if need_x else grad.new_empty(0)
    grad_w = sorted_pairs_grad_weight(grad, x, idx, traceable=True) if need_w else grad.new_empty(0)
    return grad_x, grad_w, _bias_only(grad, need_b)


#: The per-example products on a GPU take one of two exact routes (PER_EXAMPLE_ROUTE:
#: "auto" picks by :func:`per_example_route`; "gather" / "masked" force one, for bench/):
#:
#: * ``gather``: kernels/per_example.py, CUDA-core FMAs over the M*k selected entries
#:   only (each example's rows of W and x gathered, re-read from L2);
#: * ``masked``: G with every unselected entry zeroed (one (M, out) buffer, written by the
#:   selection's own launch), then the two dense GEMMs of cuBLAS on tensor cores: the
#:   same sums with zeros added. Taken only for the top-k op's own selection (distinct,
#:   in-range indices).
#:
#: The crossover, measured on an H200 (bench/results/gpu-h200-2026-12-04, bf16, M = 8192,
#: in = out = 4096): the gather kernels reach only about 1 TFLOP/s of useful work there
#: (5.4 ms at k = 1 %, 10.2 ms at 5 %, 28.5 ms at 25 %), while the masked route costs
#: about the dense GEMMs' time plus the per-row selection and the masked copy whatever k
#: is (1.33-1.37 ms at k = 1-5 %, of which 620 us was a per-row selection that read each
#: row five times; the selection now holds the row in registers and writes the masked
#: copy itself, not yet timed on a GPU). So the masked route wins once k/out exceeds about the
#: ratio of those rates: 1/600 in 16-bit (dense GEMMs ~600 TFLOP/s), 1/300 in tf32
#: (~300) and 1/50 in plain fp32 (~50), on enough rows (M >= 256) that the GEMMs are not
#: latency-bound.
PER_EXAMPLE_ROUTE = "auto"
MASKED_MIN_ROWS = 256
MASKED_MIN_SHARE = {"16bit": 1 / 600, "tf32": 1 / 300, "fp32": 1 / 50}


def per_example_route(M: int, n_out: int, k: int, dtype: torch.dtype) -> str:
    """``"gather"`` or ``"masked"``: the faster exact route for per-example products of
    this shape (see :data:`PER_EXAMPLE_ROUTE`)."""
    if PER_EXAMPLE_ROUTE != "auto":
        return PER_EXAMPLE_ROUTE
    if dtype == torch.float32:
        kind = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    else:
        kind = "16bit"
    if M >= MASKED_MIN_ROWS and k >= MASKED_MIN_SHARE[kind] * n_out:
        return "masked"
    return "gather"


def _masked_products(
    masked: Tensor, grad: Tensor, x: Tensor, weight: Tensor, need_x: bool, need_w: bool, need_b: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-example products through ``masked`` (G with every unselected entry zeroed,
    written by the selection's own launch: ``row_topk_indices(..., masked=)``) and two
    dense GEMMs. The same sums as the gather kernels, except where W's or x's unselected
    entries are inf or NaN (0 * inf is NaN in a GEMM; the gather route never reads
    them), and in fp16 / bf16 cuBLAS may reduce in reduced precision where torch allows
    it (``torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction`` and its
    fp16 twin, on by default) rather than in fp32 throughout."""
    grad_x = masked @ weight if need_x else grad.new_empty(0)
    grad_w = masked.t() @ x if need_w else grad.new_empty(0)
    return grad_x, grad_w, _bias_only(grad, need_b)


def _per_example_topk_backward(
    grad: Tensor, x: Tensor, weight: Tensor, k: int, need_x: bool, need_w: bool, need_b: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The products, then the (M, k) selection (empty when none was made). The masked
    route is taken only here, where the indices are the kernel's own (distinct and in
    range); given indices (``_per_example_backward_from_indices``) take the gather
    kernels, which skip out-of-range ones as documented."""
    if not (need_x or need_w):
        return grad.new_empty(0), grad.new_empty(0), _bias_only(grad, need_b), _no_indices(grad)
    if per_example_route(grad.shape[0], grad.shape[1], k, grad.dtype) == "masked":
        masked = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
        idx = row_topk_indices(grad, k, masked=masked, traceable=True)
        return (*_masked_products(masked, grad, x, weight, need_x, need_w, need_b), idx)
    idx = row_topk_indices(grad, k, traceable=True)
    return (*_per_example_products(grad, x, weight, idx, need_x, need_w, need_b), idx)


def _per_example_backward_from_indices(
    grad: Tensor, x: Tensor, weight: Tensor, idx: Tensor, need_x: bool, need_w: bool, need_b: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return _per_example_products(grad, x, weight, idx, need_x, need_w, need_b)


def _unified_backward_from_indices(
    grad: Tensor, x: Tensor, weight: Tensor, idx: Tensor, need_x: bool, need_w: bool, need_b: bool
) -> tuple[Tensor, Tensor, Tensor]:
    if not (need_x or need_w):
        return grad.new_empty(0), grad.new_empty(0), _bias_only(grad, need_b)
    n_out, k = grad.shape[1], idx.shape[0]
    # The selection sorted and its complement (the rows grad_W gets zeros in), on the
    # device and without a host sync: mark the units with 1.0 and let the top-k kernel
    # compact them, ascending, and the others after them.
    marks = torch.zeros(n_out, dtype=torch.float32, device=grad.device)
    marks.index_fill_(0, idx, 1.0)
    route = unified_gemm_route()
    sel = topk_indices(marks, k, return_rest=route == "triton", traceable=True)
    sel, rest = sel if route == "triton" else (sel, None)
    grad_x, grad_w = _unified_products(route, grad, x, weight, sel, rest, need_x, need_w)
    return grad_x, grad_w, _bias_only(grad, need_b)


def _fake_products(grad, x, weight, need_x, need_w, need_b):
    M, n_out = grad.shape
    n_in = weight.shape[1]
    return (
        grad.new_empty((M, n_in)) if need_x else grad.new_empty(0),
        grad.new_empty((n_out, n_in)) if need_w else grad.new_empty(0),
        grad.new_empty((n_out,)) if need_b else grad.new_empty(0),
    )


def _fake_with_k(grad, x, weight, k, need_x, need_w, need_b):
    shape = (grad.shape[0], k) if (need_x or need_w) else (0,)
    return (*_fake_products(grad, x, weight, need_x, need_w, need_b), grad.new_empty(shape, dtype=torch.int64))


def _fake_with_idx(grad, x, weight, idx, need_x, need_w, need_b):
    return _fake_products(grad, x, weight, need_x, need_w, need_b)


_per_example_op = _register(PER_EXAMPLE_OP_NAME, _per_example_topk_backward, _fake_with_k)
_per_example_idx_op = _register(PER_EXAMPLE_IDX_OP_NAME, _per_example_backward_from_indices, _fake_with_idx)
_unified_idx_op = _register(UNIFIED_IDX_OP_NAME, _unified_backward_from_indices, _fake_with_idx)
# MePropConv1D's unified top-k (its body and fake live with the layer). Registered here,
# at import, never on a layer's first backward: that may run inside torch.compile's
# trace, which refuses to trace torch.library.triton_op and would break the graph.
_conv1d_op = _register(
    _conv1d.CONV1D_OP_NAME, _conv1d._conv1d_unified_topk_backward, _conv1d._fake_conv1d_unified_topk_backward
)


def _check_linear(grad: Tensor, x: Tensor, weight: Tensor) -> None:
    if grad.dim() != 2 or x.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"grad, x and weight must be 2-D; got {tuple(grad.shape)}, {tuple(x.shape)}, "
            f"{tuple(weight.shape)}"
        )
    M, n_out = grad.shape
    if tuple(weight.shape) != (n_out, x.shape[1]) or x.shape[0] != M:
        raise ValueError(
            f"shapes do not fit y = x W^T: grad {tuple(grad.shape)}, x {tuple(x.shape)}, "
            f"weight {tuple(weight.shape)}"
        )


def _check_operand_types(grad: Tensor, x: Tensor, weight: Tensor, need_x: bool, need_w: bool) -> None:
    """The operands a unified product reads share grad's dtype and device (weight for
    grad_x, x for grad_W), checked before any work, whichever route runs."""
    for name, t, needed in (("weight", weight, need_x), ("x", x, need_w)):
        if needed and (t.dtype != grad.dtype or t.device != grad.device):
            raise TypeError(
                f"grad and {name} must share dtype and device; got {grad.dtype} on "
                f"'{grad.device}' and {t.dtype} on '{t.device}'"
            )


def _check_indices(idx: Tensor, grad: Tensor, dim: int) -> None:
    shape = "(M, k)" if dim == 2 else "(k,)"
    if not isinstance(idx, Tensor) or idx.dim() != dim or idx.dtype != torch.int64:
        got = f"{idx.dtype} of shape {tuple(idx.shape)}" if isinstance(idx, Tensor) else type(idx).__name__
        raise TypeError(f"idx must be an int64 tensor of shape {shape}; got {got}")
    if idx.device != grad.device:
        raise ValueError(f"idx is on '{idx.device}' but grad on '{grad.device}'")
    M, n_out = grad.shape
    if dim == 2 and idx.shape[0] != M:
        raise ValueError(f"idx has {idx.shape[0]} rows; grad has {M}")
    k = idx.shape[-1]
    if not 1 <= k <= n_out:
        raise ValueError(f"idx must hold k in [1, out_features={n_out}] units (per row); got {k}")


def _check_index_values(idx: Tensor, n_out: int) -> None:
    """Refuse a unit outside ``[0, n_out)``, or one repeated (within a row, for an
    ``(M, k)`` selection), naming it. Reads the indices on the host: one sync on a GPU,
    which a CUDA-graph capture refuses (callers there pass ``check_indices=False``)."""
    if idx.numel() == 0:
        return
    s = idx.sort(dim=-1).values
    repeated = s[..., 1:] == s[..., :-1]
    lo, hi, n_repeated = torch.stack([s[..., 0].min(), s[..., -1].max(), repeated.sum()]).tolist()
    if lo < 0 or hi >= n_out:
        raise ValueError(f"idx must hold units in [0, out_features={n_out}); got {lo if lo < 0 else hi}")
    if n_repeated:
        at = repeated.nonzero()[0].tolist()
        unit = s[tuple(at)].item()
        row = f" in row {at[0]}" if idx.dim() == 2 else ""
        raise ValueError(f"idx must hold distinct units; unit {unit} appears more than once{row}")


def _none_where_not_needed(outs, need_x, need_w, need_b):
    gx, gw, gb = outs
    return (gx if need_x else None, gw if need_w else None, gb if need_b else None)


def per_example_topk_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    k: int,
    need_x: bool = True,
    need_w: bool = True,
    need_b: bool = True,
    return_indices: bool = False,
):
    """Per-example top-k meProp gradients (``unified=False``) with the Triton kernels.

    Args as :func:`unified_topk_backward`: ``grad: (M, out)``, ``x: (M, in)``,
    ``weight: (out, in)`` (any strides, one of fp32 / fp16 / bf16), ``k`` in ``[1, out]``.

    Row m keeps ``S_m`` = the k largest ``|grad[m, :]|`` (ties to the lower index, NaN and
    inf both as +inf: ``reference.per_example_topk_indices`` on rows without NaN, which
    ranks NaN above +inf). Returns
    ``grad_x[m] = sum_{j in S_m} grad[m, j] W[j, :]``,
    ``grad_W[j, :] = sum_{m: j in S_m} grad[m, j] x[m, :]`` (zero rows where no example
    kept j) and the dense ``grad_b = grad.sum(0)``, in grad's dtype with fp32
    accumulation, None where not asked for; with ``return_indices=True`` also the
    ``(M, k)`` selection (empty when neither grad_x nor grad_W was asked for).
    Bit-for-bit deterministic.
    """
    _check_linear(grad, x, weight)
    k = int(k)
    if not 1 <= k <= grad.shape[1]:
        raise ValueError(f"k must lie in [1, out_features={grad.shape[1]}]; got {k}")
    *outs, idx = call_op(
        "per_example_topk_backward", _per_example_topk_backward,
        (grad, x, weight, k, bool(need_x), bool(need_w), bool(need_b)), (grad, x, weight),
    )
    outs = _none_where_not_needed(outs, need_x, need_w, need_b)
    return (*outs, idx) if return_indices else outs


def per_example_backward_from_indices(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    idx: Tensor,
    need_x: bool = True,
    need_w: bool = True,
    need_b: bool = True,
    *,
    check_indices: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Per-example meProp gradients for a given selection ``idx: (M, k)`` int64.

    Row m keeps the units ``idx[m, :]`` (distinct, in ``[0, out)``, any order; e.g.
    ``reference.per_example_random_indices(M, out, k, generator=..., device=grad.device)``
    for per-example random-k). Same products and outputs as
    :func:`per_example_topk_backward`; equal to ``reference.per_example_backward``.
    A unit outside ``[0, out)`` or repeated within a row is refused (ValueError) before
    any work; the check reads ``idx`` on the host, one sync on a GPU.
    ``check_indices=False`` skips it, for selections known to be valid (as the layers'
    own random draws are; inside a CUDA-graph capture, which refuses the sync, and under
    ``torch.compile(fullgraph=True)``, where it would break the graph): the kernels then skip units outside ``[0, out)``, and a repeated unit counts twice in
    ``grad_x`` but once in ``grad_W``.
    """
    _check_linear(grad, x, weight)
    _check_indices(idx, grad, 2)
    if check_indices:
        _check_index_values(idx, grad.shape[1])
    outs = call_op(
        "per_example_backward_from_indices", _per_example_backward_from_indices,
        (grad, x, weight, idx, bool(need_x), bool(need_w), bool(need_b)), (grad, x, weight, idx),
    )
    return _none_where_not_needed(outs, need_x, need_w, need_b)


def unified_backward_from_indices(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    idx: Tensor,
    need_x: bool = True,
    need_w: bool = True,
    need_b: bool = True,
    *,
    check_indices: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Unified meProp gradients for a given set of units ``idx: (k,)`` int64.

    ``idx``: distinct units in ``[0, out)``, any order (e.g.
    ``reference.random_indices(out, k, generator=..., device=grad.device)`` for unified
    random-k). The compacted GEMMs of :func:`unified_topk_backward` with that set:
    ``grad_x = grad[:, S] @ W[S, :]``, ``grad_W[S] = grad[:, S]^T x`` (other rows zero),
    dense ``grad_b``; equal to ``reference.unified_backward``. A unit outside
    ``[0, out)`` or repeated is refused (ValueError) before any work; the check reads
    ``idx`` on the host, one sync on a GPU. ``check_indices=False`` skips it, for sets
    known to be valid (the layers' own random draws; inside a CUDA-graph capture or
    ``torch.compile(fullgraph=True)``): the complement of ``S`` is then made on the device with no host sync, and an invalid
    set is the caller's error (a unit out of range fails in ``index_fill_``, on a GPU
    as a device-side assert; a repeated one leaves fewer than k units marked, made up
    with the lowest unmarked ones).
    """
    _check_linear(grad, x, weight)
    _check_indices(idx, grad, 1)
    if check_indices:
        _check_index_values(idx, grad.shape[1])
    _check_operand_types(grad, x, weight, need_x, need_w)
    outs = call_op(
        "unified_backward_from_indices", _unified_backward_from_indices,
        (grad, x, weight, idx, bool(need_x), bool(need_w), bool(need_b)), (grad, x, weight, idx),
    )
    return _none_where_not_needed(outs, need_x, need_w, need_b)
