"""``MePropConv1D``: meProp for transformers' ``Conv1D`` (GPT-2's linear layer).

transformers' ``Conv1D(nf, nx)`` is a linear layer whose weight is stored transposed:
``weight: (nx, nf) = (in, out)``, ``bias: (nf,)``, ``y = x @ weight + bias``. GPT-2,
GPT-J's ancestors and others use it for their attention and MLP projections.
``MePropConv1D`` keeps that layout (same parameter names, shapes, init and
``state_dict``, so a converted model loads into the plain one and back) and has
``MePropLinear``'s backward with units = output features (columns of the stored weight):

* ``grad_x = G[:, S] @ weight[:, S]ᵀ``;
* ``grad_weight[:, S] = Xᵀ @ G[:, S]``, every other column zero;
* ``grad_bias = Σ_m G[m, :]``, dense and exact.

Where the work runs:

* the torch path, unified selection (top-k or random, the default on CPUs): the weight
  gradient is built directly in the stored ``(in, out)`` layout, no transposed copy;
* the torch path, per-example selection (``unified=False``): ``reference``'s per-example
  products on the transposed view; their row sums read whole rows of the ``(out, in)``
  view, so the weight is copied to that layout once per backward (not where k is a
  large share of the units and two dense GEMMs run instead), and the weight gradient,
  made ``(out, in)``, is copied back into the parameter's layout by autograd;
* the Triton backend (``backend="triton"``, or ``"auto"`` on CUDA), unified top-k (the
  default): the Triton kernels score and select the units (one pass over G, which also
  gives the bias gradient), and the products are GEMMs over the k selected columns
  (``torch.ops.meprop_triton.conv1d_unified_topk_backward``), the weight gradient written
  straight into the ``(in, out)`` layout: no transposed copy;
* unified random-k on either backend: the draw, then the same GEMMs over the selected
  columns as the torch path (no Triton kernel: there is nothing to score);
* the Triton backend, per-example selection (top-k or random): the existing ops on the
  transposed view ``weight.t()``. Their kernels load the weight along its rows, so they
  copy it once per backward to a contiguous ``(out, in)`` tensor (``kernels/matmul.py``,
  ``COPY_NON_UNIT_INNER``), and their ``(out, in)`` weight gradient is transposed into
  the parameter's layout by autograd, a second copy: two passes over an ``(in x out)``
  tensor per backward that ``MePropLinear`` does not make.

``sparse_grad=True`` is refused: the kept units are columns of the stored weight, which a
row-sparse COO gradient (what SGD, Adagrad and SparseAdam take) cannot hold.
"""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F
from torch import Tensor, nn

from . import reference
from ._validation import check_dtype_arg, check_k, check_options, check_strided, resolve_k
from .functional import _any_autocast, _autocast_dtype, _linear_jvp, autocast_on, needs_backward, resolve_backend
from .nn import _finish_swap, _lost_in_swap, _MePropSettings

__all__ = ["MePropConv1D", "meprop_conv1d", "is_conv1d"]

_SETTINGS = ("k", "unified", "selection", "sparse_grad", "backend", "track_selection")


def is_conv1d(module) -> bool:
    """True for a module laid out as transformers' ``Conv1D`` (recognised by duck typing,
    so transformers stays optional): class name ``Conv1D``, an int ``nf``, a 2-D
    ``weight`` Parameter of shape ``(in, nf)`` and a ``bias`` of shape ``(nf,)`` or None."""
    if type(module).__name__ != "Conv1D" or not isinstance(module, nn.Module):
        return False
    nf = getattr(module, "nf", None)
    weight = module._parameters.get("weight")
    bias = module._parameters.get("bias") if "bias" in module._parameters else None
    return (
        isinstance(nf, int)
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 2
        and weight.shape[1] == nf
        and (bias is None or (isinstance(bias, Tensor) and tuple(bias.shape) == (nf,)))
    )


def _refuse_sparse(value) -> None:
    if value is True:
        raise ValueError(
            "sparse_grad=True is not supported for Conv1D layers: their weight is stored "
            "(in, out), so the units meProp keeps are columns of it, which a row-sparse COO "
            "gradient cannot hold; use sparse_grad=False (dense gradients, zero in the "
            "unselected columns)"
        )


def _check_args(x, weight, bias) -> None:
    """The checks ``torch.addmm`` would make, with messages naming the bad value."""
    for name, t in (("input", x), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None; got {type(bias).__name__}")
    for name, t in (("input", x), ("weight", weight), ("bias", bias)):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"meProp needs floating-point tensors; {name} has dtype {t.dtype}")
    check_strided(x, weight, bias, "MePropConv1D")  # as Conv1D, whose x.view cannot take them
    if weight.dim() != 2:
        raise ValueError(f"a Conv1D weight must be 2-D (in, out); got shape {tuple(weight.shape)}")
    n_in, n_out = weight.shape
    if x.dim() == 0 or x.shape[-1] != n_in:
        raise ValueError(
            f"input's last dimension must equal the layer's input width {n_in} (the Conv1D "
            f"weight {tuple(weight.shape)} is stored (in, out)); got input of shape {tuple(x.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (n_out,):
        raise ValueError(f"bias must have shape ({n_out},) to match weight {tuple(weight.shape)} (in, out); got {tuple(bias.shape)}")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        got = f"input {x.dtype}, weight {weight.dtype}" + (f", bias {bias.dtype}" if bias is not None else "")
        raise TypeError(f"input, weight and bias must share one dtype; got {got}")
    devices = {t.device for t in (x, weight, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"input, weight and bias must be on one device; got {sorted(map(str, devices))}")


def _forward(x2d: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x2d @ weight if bias is None else torch.addmm(bias, x2d, weight)


def _save(ctx, x2d, weight, k, backend, unified, selection, generator, counts) -> None:
    ctx.k, ctx.backend, ctx.unified, ctx.selection = k, backend, unified, selection
    ctx.generator, ctx.counts = generator, counts
    if ctx.needs_input_grad[1] or backend != "torch":
        ctx.save_for_backward(x2d, weight)
    else:  # a frozen weight: the input is not kept (see functional._stand_in)
        ctx.save_for_backward(None, weight)
        ctx.x_spec = (x2d.shape, x2d.dtype)
    if _forward_ad._current_level >= 0:  # inside forward_ad.dual_level(): jvp may follow
        ctx.save_for_forward(x2d, weight)


class MePropConv1DFunction(torch.autograd.Function):
    """``x @ weight + bias`` (weight ``(in, out)``) forward, meProp backward: the form
    ``torch.func`` transforms and ``torch.compile`` need (a separate ``setup_context``)."""

    @staticmethod
    def forward(x2d, weight, bias, k, backend, unified, selection, generator, counts):
        return _forward(x2d, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x2d, weight, bias, k, backend, unified, selection, generator, counts = inputs
        _save(ctx, x2d, weight, k, backend, unified, selection, generator, counts)

    @staticmethod
    def backward(ctx, grad):
        return _backward(ctx, grad)


class _EagerConv1DFunction(torch.autograd.Function):
    """The same in the combined form, which torch applies without binding the arguments
    to a signature on each call (used outside transforms and compilation)."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, k, backend, unified, selection, generator, counts):
        _save(ctx, x2d, weight, k, backend, unified, selection, generator, counts)
        return _forward(x2d, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        return _backward(ctx, grad)

    @staticmethod
    def jvp(ctx, x_t, w_t, b_t, *_):
        return _linear_jvp(ctx, x_t, w_t, b_t, transposed=True)


def _count(counts: Tensor, idx: Tensor | None, rows: int) -> None:
    # As MePropLinear's counters: +rows per unit of a unified set, +1 per (row, unit) of a
    # per-row set, ``rows`` to the last entry; device operations only.
    if idx is None:
        counts.add_(rows)
        return
    flat = idx.reshape(-1)
    counts.index_add_(0, flat, torch.full_like(flat, rows if idx.dim() == 1 else 1))
    counts[-1:].add_(rows)


def _backward(ctx, grad: Tensor):
    if _any_autocast() and autocast_on(grad.device.type):
        # backward() called inside an autocast region: compute in the tensors' own
        # dtypes, as the forward was (MePropLinear's backward does the same).
        with torch.autocast(grad.device.type, enabled=False):
            return _backward(ctx, grad)
    x, weight = ctx.saved_tensors  # x (M, in), weight (in, out)
    if x is None:
        from .functional import _stand_in

        x = _stand_in(ctx.x_spec)
    backend = ctx.backend
    if reference.is_legacy_batched(grad):  # the torch path, as under torch.func.vmap
        from .functional import _unbatchable

        reference.refuse_legacy_batched("MePropConv1D", _unbatchable(ctx.selection, False, ctx.counts))
        backend = "torch"
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    n_out = weight.shape[1]
    k = ctx.k
    idx = None
    gx = gw = gb = None
    if k >= n_out:
        gx = F.linear(grad, weight) if need_x else None  # grad @ weight.t()
        gw = x.t() @ grad if need_w else None
        gb = grad.sum(0) if need_b else None
    elif backend == "triton" and ctx.unified and ctx.selection == "topk":
        if need_x or need_w:
            gx, gw, gb, idx = _triton_unified_topk(grad, x, weight, k, need_x, need_w, need_b)
        else:
            gb = grad.sum(0) if need_b else None
    elif backend == "triton" and not ctx.unified:
        gx, gw_t, gb, idx = _triton_backward(ctx, grad, x, weight.t(), k, (need_x, need_w, need_b))
        gw = gw_t.t() if gw_t is not None else None
    elif ctx.unified:
        # torch path, and unified random-k on either backend: a random draw, then GEMMs
        # over the k selected columns (cuBLAS on CUDA tensors) in the stored layout.
        if ctx.selection == "random":
            idx = reference.random_indices(n_out, k, generator=ctx.generator, device=grad.device)
        else:
            idx = reference.unified_topk_indices(grad, k, sort=False)
        if need_x or need_w:
            g_s = grad.index_select(1, idx)  # (M, k)
            if need_x:
                # g_s @ weight[:, S].t(), as F.linear: on a 2-core CPU at 1024 x 3072 -> 768,
                # k = 154, 1.3 ms, where matmul on the transposed view took 9 ms
                gx = F.linear(g_s, weight.index_select(1, idx))
            if need_w:
                # Built in the parameter's (in, out) layout: no transposed copy.
                gw = reference._weight_grad_zeros(tuple(weight.shape), grad)
                gw.index_copy_(1, idx, x.t() @ g_s)
        gb = grad.sum(0) if need_b else None
    else:
        if ctx.selection == "topk":
            idx = reference.per_example_topk_indices(grad, k, sort=False)
        else:
            idx = reference.per_example_random_indices(
                grad.shape[0], n_out, k, generator=ctx.generator, device=grad.device, sort=False
            )
        w_lin = weight.t()
        if need_x and not reference._masked_gemm_pays(grad.shape[0], k, n_out):
            # the row sums gather rows of (out, in): one copy beats embedding_bag on the
            # transposed view (4096 x 4096 fp32 on a 2-core CPU: 76 + 7 ms against 100 ms)
            w_lin = w_lin.contiguous()
        gx, gw_t, gb = reference.per_example_backward(
            grad, x, w_lin, idx, need_input=need_x, need_weight=need_w, need_bias=need_b
        )
        gw = gw_t.t() if gw_t is not None else None
    counts = ctx.counts
    if counts is not None and (need_x or need_w) and (idx is None or idx.numel() > 0):
        _count(counts, idx, grad.shape[0])
    return gx, gw, gb, None, None, None, None, None, None


CONV1D_OP_NAME = "meprop_triton::conv1d_unified_topk_backward"


def _conv1d_unified_topk_backward(
    grad: Tensor, x: Tensor, weight: Tensor, k: int, need_x: bool, need_w: bool, need_b: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Unified top-k for a weight stored ``(in, out)``: the Triton kernels score the units
    (one pass over G, the bias gradient in the same pass) and select them; the products
    are GEMMs over the k selected columns, with the weight gradient written straight
    into the ``(in, out)`` layout. Outputs not asked for are empty tensors."""
    from .triton_ops import select_units

    idx, _, grad_b = select_units(grad, k)
    g_s = grad.index_select(1, idx)  # (M, k)
    grad_x = F.linear(g_s, weight.index_select(1, idx)) if need_x else grad.new_empty(0)
    if need_w:
        grad_w = grad.new_zeros(weight.shape)
        grad_w.index_copy_(1, idx, x.t() @ g_s)
    else:
        grad_w = grad.new_empty(0)
    return grad_x, grad_w, grad_b if need_b else grad.new_empty(0), idx


def _fake_conv1d_unified_topk_backward(grad, x, weight, k, need_x, need_w, need_b):
    return (
        grad.new_empty((grad.shape[0], weight.shape[0])) if need_x else grad.new_empty(0),
        grad.new_empty(tuple(weight.shape)) if need_w else grad.new_empty(0),
        grad.new_empty((grad.shape[1],)) if need_b else grad.new_empty(0),
        grad.new_empty((k,), dtype=torch.int64),
    )


def _triton_unified_topk(grad, x, weight, k, need_x, need_w, need_b):
    """``torch.ops.meprop_triton.conv1d_unified_topk_backward``: registered with the other
    Triton ops when ``triton_ops`` is first imported (importing triton then, never at
    package import), so that registering it is never part of what ``torch.compile``
    traces. A ``triton_op`` that ``torch.compile`` traces into, or under the interpreter
    an opaque custom op with a fake."""
    from . import triton_ops

    gx, gw, gb, idx = triton_ops.call_op(
        "conv1d_unified_topk_backward", _conv1d_unified_topk_backward,
        (grad, x, weight, int(k), bool(need_x), bool(need_w), bool(need_b)), (grad, x, weight),
    )
    return (gx if need_x else None, gw if need_w else None, gb if need_b else None, idx)


def _triton_backward(ctx, grad, x, w_lin, k, needs):
    """Per-example selection on the Triton backend: the ops on the transposed view
    ``w_lin = weight.t()`` (out, in)."""
    from . import triton_ops

    n_out = w_lin.shape[0]
    if ctx.selection == "random":
        idx = reference.per_example_random_indices(grad.shape[0], n_out, k, generator=ctx.generator, device=grad.device)
        return (*triton_ops.per_example_backward_from_indices(grad, x, w_lin, idx, *needs, check_indices=False), idx)
    return triton_ops.per_example_topk_backward(grad, x, w_lin, k, *needs, return_indices=True)


def _apply(x2d, weight, bias, k, backend, unified, selection, generator, counts):
    if torch._C._are_functorch_transforms_active():
        # torch.func (grad, vmap(grad), jacrev): MePropLinear's Function on the transposed
        # view, whose vmap rule and grad of grad this layer then shares, with its
        # semantics (each vmapped entry its own call). The gradient of the view is
        # transposed back by autograd: a copy, off the eager path.
        from .functional import apply_meprop

        return apply_meprop(x2d, weight.t(), bias, k, backend, unified, selection, False, generator, counts)
    args = (x2d, weight, bias, k, backend, unified, selection, generator, counts)
    if torch.compiler.is_compiling():
        return MePropConv1DFunction.apply(*args)
    return _EagerConv1DFunction.apply(*args)


def meprop_conv1d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    k,
    unified: bool = True,
    selection: str = "topk",
    backend: str = "auto",
    generator: torch.Generator | None = None,
    counts: Tensor | None = None,
) -> Tensor:
    """``input @ weight + bias`` with ``weight: (in, out)`` (transformers' ``Conv1D``
    layout), whose backward keeps only the top-k output units (columns of ``weight``);
    the arguments as :func:`meprop_triton.meprop_linear`'s (no ``sparse_grad``). Every
    argument is checked before any work is done."""
    check_options(unified=unified, selection=selection, backend=backend)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    check_k(k, "nf")
    dtype = _autocast_dtype(input)
    if dtype is not None:
        # autocast's cast, done here, differentiably (fp64 left alone), before the checks:
        # under autocast a layer meets inputs in another dtype than its weights (GPT-2's
        # c_proj gets the attention's bf16 output, its weights fp32), as Conv1D's addmm does.
        def cast(t):
            if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64:
                return t.to(dtype)
            return t

        input, weight, bias = cast(input), cast(weight), cast(bias)
    _check_args(input, weight, bias)
    n_in, n_out = weight.shape
    if counts is not None and (
        not isinstance(counts, Tensor) or counts.dtype != torch.int64
        or tuple(counts.shape) != (n_out + 1,) or counts.device != weight.device
    ):
        raise ValueError(f"counts must be an int64 tensor of shape ({n_out + 1},) (out + 1) on '{weight.device}'")
    if generator is not None and generator.device.type != input.device.type:
        raise ValueError(
            f"generator lives on '{generator.device}' but the tensors on '{input.device}'; "
            f"pass a torch.Generator(device='{input.device.type}')"
        )
    resolved = resolve_backend(backend, input.device, input.dtype)
    lead = input.shape[:-1]
    x2d = input.reshape(math.prod(input.shape[:-1]), n_in)  # (not -1: a vmap over no entries)
    if not needs_backward(input, weight, bias):
        return _forward(x2d, weight, bias).view(*lead, n_out)
    k_units = resolve_k(k, n_out)
    if dtype is None:
        out = _apply(x2d, weight, bias, k_units, resolved, unified, selection, generator, counts)
    else:
        with torch.autocast(input.device.type, enabled=False):
            out = _apply(x2d, weight, bias, k_units, resolved, unified, selection, generator, counts)
    return out.view(*lead, n_out)


class MePropConv1D(_MePropSettings, nn.Module):
    """transformers' ``Conv1D`` with a meProp backward.

    ``MePropConv1D(nf, nx, *, k, ...)``: ``nf`` output features, ``nx`` input features,
    as ``Conv1D(nf, nx)``. Parameters ``weight: (nx, nf)`` (stored (in, out)) and
    ``bias: (nf,)``, initialised as ``Conv1D`` does (normal with std 0.02, zero bias);
    forward ``x @ weight + bias``, unchanged. The settings are ``MePropLinear``'s (``k``
    an int >= 1 or a fraction of ``nf`` in (0, 1], ``unified``, ``selection``,
    ``backend``, ``track_selection``), checked when set; ``sparse_grad=True`` is refused
    (see the module's docstring). ``from_conv1d(layer, k=...)`` wraps an existing layer,
    sharing its Parameter objects.

    ``track_selection=True`` keeps ``MePropLinear``'s selection statistics, per output
    feature (a non-persistent int64 buffer ``selection_counts`` of ``nf + 1`` entries, the
    last one counting the rows): ``selection_stats()`` reads them as a
    :class:`~meprop_triton.SelectionStats`, ``reset_selection_stats()`` zeroes them.
    """

    def __init__(
        self,
        nf: int,
        nx: int,
        *,
        k,
        bias: bool = True,
        unified: bool = True,
        selection: str = "topk",
        sparse_grad: bool = False,
        backend: str = "auto",
        track_selection: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        for name, v in (("nf", nf), ("nx", nx)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1; got {v!r}")
        check_k(k, "nf")
        check_dtype_arg(dtype)
        check_options(unified=unified, selection=selection, sparse_grad=sparse_grad, backend=backend,
                      track_selection=track_selection)
        _refuse_sparse(sparse_grad)
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(nf, device=device, dtype=dtype)) if bias else None
        if self.weight.device.type != "meta":
            nn.init.normal_(self.weight, std=0.02)
        self.k = k
        self.unified = unified
        self.selection = selection
        self.backend = backend
        self.track_selection = track_selection

    # Settings, checked when set (a refused value keeps the old one): k, unified,
    # selection, backend, track_selection and its counters come from _MePropSettings.
    _units_name = "nf"

    def _n_units(self) -> int:
        return self.nf

    @property
    def sparse_grad(self) -> bool:
        """Always False: row-sparse gradients cannot hold a Conv1D's kept columns."""
        return False

    @sparse_grad.setter
    def sparse_grad(self, value) -> None:
        check_options(sparse_grad=value)
        _refuse_sparse(value)

    @classmethod
    def from_conv1d(cls, layer: nn.Module, *, k, **options) -> "MePropConv1D":
        """A ``MePropConv1D`` sharing ``layer``'s Parameter objects (no copy); ``layer`` is
        a transformers ``Conv1D`` (or any module :func:`is_conv1d` accepts)."""
        if not (is_conv1d(layer) or isinstance(layer, MePropConv1D)):
            raise TypeError(
                f"from_conv1d expects a transformers Conv1D (class Conv1D with nf, weight (in, nf) "
                f"and bias (nf,)); got {type(layer).__name__}"
            )
        unknown = set(options) - set(_SETTINGS[1:])
        if unknown:
            raise TypeError(f"from_conv1d got unexpected option(s): {', '.join(sorted(unknown))}")
        lost = _lost_in_swap(layer, ("weight", "bias"))
        if lost is not None:
            raise TypeError(f"from_conv1d cannot wrap this {type(layer).__name__}: {lost}")
        weight = layer.weight
        nx, nf = weight.shape
        new = cls(nf, nx, k=k, bias=layer.bias is not None, device="meta", dtype=weight.dtype, **options)
        new.weight = weight
        if layer.bias is not None:
            new.bias = layer.bias
        return _finish_swap(layer, new, weight.device)

    def forward(self, input: Tensor) -> Tensor:
        weight, bias = self.weight, self.bias
        # The common case in few Python operations (as MePropLinear's): floating-point
        # CPU or CUDA tensors of one dtype, no autocast, the torch path or "auto". Anything
        # else, and any error, takes meprop_conv1d's full checks, which name the bad value.
        if (
            isinstance(input, Tensor)
            and isinstance(weight, Tensor)
            and self._backend != "triton"
            and not _any_autocast()
            and weight.dim() == 2
            and input.dim() > 0
            and input.shape[-1] == weight.shape[0]
            and input.dtype == weight.dtype
            and weight.dtype.is_floating_point
            and (weight.is_cpu or weight.is_cuda)
            and (bias is None or (isinstance(bias, Tensor) and bias.shape == weight.shape[1:] and bias.dtype == weight.dtype))
        ):
            n_in, n_out = weight.shape
            try:
                x2d = input.reshape(math.prod(input.shape[:-1]), n_in)  # (not -1: a vmap over no entries)
                if not needs_backward(input, weight, bias):
                    return _forward(x2d, weight, bias).view(*input.shape[:-1], n_out)
                k_for = self.__dict__.get("_k_for")
                if k_for is None or k_for[0] != n_out:
                    k_for = self.__dict__["_k_for"] = (n_out, resolve_k(self._k, n_out))
                backend = "torch" if weight.is_cpu else resolve_backend(self._backend, weight.device, weight.dtype)
                out = _apply(
                    x2d, weight, bias, k_for[1], backend, self._unified, self._selection, None,
                    self._buffers.get("selection_counts"),
                )
                return out.view(*input.shape[:-1], n_out)
            except RuntimeError:
                _check_args(input, weight, bias)  # the clear error, where it is a bad input
                raise
        return meprop_conv1d(
            input, weight, bias, k=self._k, unified=self._unified, selection=self._selection,
            backend=self._backend, counts=self._buffers.get("selection_counts"),
        )

    def extra_repr(self) -> str:
        s = f"nf={self.nf}, nx={self.nx}, k={self.k!r}"
        if self.bias is None:
            s += ", bias=False"
        if not self.unified:
            s += ", unified=False"
        if self.selection != "topk":
            s += f", selection={self.selection!r}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        if self.track_selection:
            s += ", track_selection=True"
        return s
