"""The meProp autograd Function, ``meprop_linear`` and backend dispatch.

The forward pass is always the ordinary ``F.linear``; only the backward changes.
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F
from torch import Tensor

try:
    from torch.nn.parallel import DistributedDataParallel as _DDP
except ImportError:  # pragma: no cover - a torch build without torch.distributed
    _DDP = None

from . import reference
from ._validation import check_linear_args, check_options, check_strided, resolve_k

__all__ = ["meprop_linear", "MePropFunction", "apply_meprop", "resolve_backend", "triton_interpreter_enabled"]


def triton_interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


#: Whether triton is installed, looked up once at import (``find_spec`` walks sys.path,
#: about 10 us, and imports nothing): installed packages do not come and go while a
#: process trains. Not on first use: that may be inside torch.compile's trace of a
#: forward, and dynamo refuses to trace ``find_spec`` (a graph break; an error with
#: ``fullgraph=True``) under Python 3.12.
_TRITON_FOUND: bool = importlib.util.find_spec("triton") is not None


def _triton_importable() -> bool:
    return _TRITON_FOUND


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The backend that runs for ``backend`` on ``dtype`` tensors that live on ``device``.

    ``"auto"`` picks the Triton kernels for CUDA tensors of a dtype they support (fp32,
    fp16, bf16) when triton is importable, and the torch path otherwise. ``"triton"`` is
    refused, with the reason, where it cannot run.
    """
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if device.type == "cuda" and dtype in _TRITON_DTYPES and _triton_importable():
            return "triton"
        return "torch"
    if device.type != "cuda" and not triton_interpreter_enabled():
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
            f"triton is imported to run the kernels on CPU tensors; got tensors on "
            f"'{device}'. Use backend='torch' (or 'auto') for the pure-torch path."
        )
    if not _triton_importable():
        raise RuntimeError("backend='triton' needs the triton package; pip install triton")
    if dtype not in _TRITON_DTYPES:
        raise TypeError(
            f"backend='triton' supports float32, float16 and bfloat16 tensors; got {dtype}. "
            f"Use backend='torch' (or 'auto') for {dtype}."
        )
    if dtype == torch.bfloat16 and device.type != "cuda" and not torch.compiler.is_compiling():
        from .kernels.interpreter_probe import bf16_dot_ok

        if not bf16_dot_ok():
            raise TypeError(
                "backend='triton' cannot run bfloat16 CPU tensors in this triton's "
                "interpreter (TRITON_INTERPRET=1): its bfloat16 tl.dot multiplies the raw "
                "16-bit patterns as integers, so every gradient would be wrong. Use "
                "float32 or float16, backend='torch', or CUDA tensors."
            )
    return "triton"


try:  # one C call, whatever the device type
    _any_autocast = torch._C._is_any_autocast_enabled
except AttributeError:  # pragma: no cover - older torch

    def _any_autocast() -> bool:
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


def autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (a backward's guard: call it after the
    one-C-call ``_any_autocast()``; autocast on for another device type alone does not
    touch this device's operations)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta)
        return False


def needs_backward(x: Tensor, weight: Tensor, bias) -> bool:
    """Whether a forward must be recorded for a meProp backward: grad mode on and a
    tensor that requires grad. Under ``vmap`` a batched tensor reports
    ``requires_grad=False`` whatever it wraps (an ensemble's stacked weights, or inputs
    that require grad, vmapped over and then back-propagated by an ordinary
    ``.backward()``), so there the wrapped tensors are asked too."""
    if not torch.is_grad_enabled():
        return False
    if x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad):
        # torch.jit.trace records the forward for inference: F.linear, not a Python
        # autograd Function, which a traced module could neither check nor save
        return not jit_tracing()
    if not torch._C._are_functorch_transforms_active():
        return False
    if torch.compiler.is_compiling():
        return True  # the Function's vmap rule decides, on the tensors it unwraps
    return any(_wrapped_requires_grad(t) for t in (x, weight, bias) if t is not None)


def jit_tracing() -> bool:
    """Whether ``torch.jit.trace`` is recording (Dynamo, before torch 2.15, cannot trace
    the check itself; under ``torch.compile`` it is not jit's tracer anyway)."""
    return not torch.compiler.is_compiling() and torch._C._is_tracing()


def _wrapped_requires_grad(t: Tensor) -> bool:
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        t = functorch.get_unwrapped(t)
        if t.requires_grad:
            return True
    return False


def sparse_under_autocast(dtype: torch.dtype) -> ValueError:
    """The refusal of ``sparse_grad=True`` under autocast (MePropLinear's and MePropLSTM's)."""
    return ValueError(
        f"sparse_grad=True cannot run under torch.autocast: autocast's cast of the weights "
        f"to {dtype} cannot pass sparse gradients back to them; keep the parameters in "
        f"{dtype} instead of autocasting, or use sparse_grad=False"
    )


def _autocast_dtype(input) -> torch.dtype | None:
    """The dtype autocast would run ``F.linear`` in for ``input``, None when it is off."""
    if not isinstance(input, Tensor) or not autocast_on(input.device.type):
        return None
    return torch.get_autocast_dtype(input.device.type)


class MePropFunction(torch.autograd.Function):
    """``F.linear`` forward; meProp backward.

    ``k`` is a resolved number of units (an int in [1, out]); ``k == out`` gives the
    exact dense gradient. ``unified``/``selection``/``generator`` choose the units kept.

    This is the form ``torch.func`` transforms and ``torch.compile`` need (a separate
    ``setup_context``). Its ``apply`` binds the arguments to ``forward``'s signature
    through ``inspect`` on every call, 45-150 us depending on the torch release, so eager
    calls go through ``_EagerMePropFunction`` instead (``apply_meprop`` chooses).

    Its ``vmap`` rule makes every vmapped entry its own call; under torch.func transforms
    the backward's gradients come from ``_MePropGrad`` (vmap rule and grad of grad).
    """

    @staticmethod
    def forward(x, weight, bias, k, backend, unified, selection, sparse_grad, generator, counts=None):
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, *settings = inputs
        if len(settings) == 6:  # counts left out
            settings.append(None)
        ctx.settings = tuple(settings)
        ctx.save_for_backward(x, weight)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        return (*_backward(ctx, grad_output), None, None, None, None, None, None, None)

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, k, backend, unified, selection, sparse_grad, generator, counts=None):
        # Each vmapped entry is its own call. Under vmap(grad(f)) the backward is
        # _MePropGrad's vmap rule, and the forward is F.linear, batched as torch batches
        # it. Where ordinary autograd records this forward (a vmapped forward, then
        # .backward() outside torch.func), one meProp call per entry, so that the
        # backward, too, is each entry's own, as a loop over the entries would give.
        dims = in_dims[:3]
        if torch.is_grad_enabled() and info.batch_size and any(
            t is not None and t.requires_grad for t in (x, weight, bias)
        ):  # (no entries: nothing to back-propagate, F.linear's empty result)

            def entry(t, dim, i):
                return t if t is None or dim is None else t.select(dim, i)

            ys = [
                apply_meprop(
                    *(entry(t, d, i) for t, d in zip((x, weight, bias), dims)),
                    k, backend, unified, selection, sparse_grad, generator, counts,
                )
                for i in range(info.batch_size)
            ]
            return torch.stack(ys), 0
        return torch.vmap(F.linear, in_dims=dims)(x, weight, bias), 0


class _MePropFunctionWithJvp(MePropFunction):
    """``MePropFunction`` with a forward-mode rule (``torch.func.jvp`` / ``jacfwd``), used
    under torch.func transforms; not under ``torch.compile``, whose dynamo refuses to trace
    a Function with a custom ``jvp`` (a graph break)."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        MePropFunction.setup_context(ctx, inputs, output)
        ctx.save_for_forward(inputs[0], inputs[1])

    @staticmethod
    def jvp(ctx, x_t, w_t, b_t, *_):
        return _linear_jvp(ctx, x_t, w_t, b_t)


class _EagerMePropFunction(torch.autograd.Function):
    """The same Function in the combined ``forward(ctx, ...)`` form, which torch applies
    without any signature binding on every supported release (torch.func transforms
    refuse this form, so ``apply_meprop`` uses it only outside them). The settings come
    as one tuple, ``(k, backend, unified, selection, sparse_grad, generator, counts)``:
    inside a training step each argument of ``apply`` costs about a microsecond."""

    @staticmethod
    def forward(ctx, x, weight, bias, settings):
        ctx.settings = settings
        if ctx.needs_input_grad[1] or settings[1] != "torch":
            ctx.save_for_backward(x, weight)
        else:  # a frozen weight: as nn.Linear, the input is not kept (see _stand_in)
            ctx.save_for_backward(None, weight)
            ctx.x_spec = (x.shape, x.dtype)
        if _forward_ad._current_level >= 0:  # inside forward_ad.dual_level(): jvp may follow
            ctx.save_for_forward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        return (*_backward(ctx, grad_output), None)

    @staticmethod
    def jvp(ctx, x_t, w_t, b_t, _):
        return _linear_jvp(ctx, x_t, w_t, b_t)


def _stand_in(spec) -> Tensor:
    """The input of a layer whose weight is frozen, as its backward sees it: its shape and
    dtype on the meta device (no memory; any arithmetic with it fails loudly). Keeping the
    input itself would hold it until the backward, for nothing, and make an in-place
    change of it an error there, where ``nn.Linear`` keeps neither. Recorded as a shape
    rather than saved as a tensor, so that saved-tensor hooks (``save_on_cpu``,
    activation offloading) never see it (the torch path only: the Triton ops take real
    tensors)."""
    return torch.empty(spec[0], dtype=spec[1], device="meta")


def _linear_jvp(ctx, x_t, w_t, b_t, transposed: bool = False):
    """Forward-mode derivative of the unchanged forward ``F.linear(x, W, b)``:
    ``x_t Wᵀ + x w_tᵀ + b_t`` (meProp changes only the backward). ``transposed``: the
    weight is stored ``(in, out)`` (MePropConv1D's ``x W + b``)."""
    x, weight = ctx.saved_tensors
    if transposed:
        weight, w_t = weight.t(), None if w_t is None else w_t.t()
    out = None
    if x_t is not None:
        out = F.linear(x_t, weight)
    if w_t is not None:
        out = F.linear(x, w_t) if out is None else out + F.linear(x, w_t)
    if b_t is not None:
        out = b_t.expand(*x.shape[:-1], b_t.shape[-1]).clone() if out is None else out + b_t
    return out


try:
    # torch's C++ ``apply`` itself, bound to the eager Function. On torch releases whose
    # ``Function.apply`` is a Python classmethod (2.13 and older) that wrapper costs about
    # 2 us a call; what it does besides (transform checks, unwrapping tensors left over
    # from a finished functorch transform) ``apply_meprop`` does first.
    _eager_apply = torch._C._FunctionBase.__dict__["apply"].__get__(None, _EagerMePropFunction)
    _is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
except (AttributeError, KeyError):  # pragma: no cover - a torch laid out otherwise
    _eager_apply = None


#: Dynamo before torch 2.15 (2.11 and 2.13 checked) reads a parameter as not requiring
#: grad inside a compiled torch.func transform (torch.compile(grad(f)), of vmap(grad(f)))
#: and inlines the Function's forward alone: the gradients came out dense, silently.
#: There the layer runs outside the graph (a graph break), so the transform is eager.
_DYNAMO_DROPS_FUNCTORCH_BACKWARDS = torch.__version__ < "2.15"
_FUNCTORCH_UNDER_COMPILE = (
    f"meProp under torch.compile of a torch.func transform (grad, vmap(grad), jacrev): "
    f"torch {torch.__version__}'s Dynamo would drop the meProp backward there, so the layer "
    f"runs outside the graph; compile without fullgraph=True, or use torch >= 2.15"
)


def apply_meprop(x, weight, bias, k, backend, unified, selection, sparse_grad, generator, counts=None):
    """Enter autograd with checked, resolved arguments (``k`` a number of units,
    ``backend`` "torch" or "triton"; ``counts`` None or the selection counters, see
    :func:`meprop_linear`): the eager Function outside torch.func transforms and
    compilation, ``MePropFunction`` inside them."""
    if sparse_grad and getattr(_DDP, "_active_ddp_module", None) is not None:
        # Inside a DistributedDataParallel forward (the class attribute DDP sets there).
        _refuse_sparse_under_ddp(_DDP._active_ddp_module, weight, bias)
    if torch.compiler.is_compiling():
        if _DYNAMO_DROPS_FUNCTORCH_BACKWARDS and torch._C._are_functorch_transforms_active():
            torch._dynamo.graph_break(msg=_FUNCTORCH_UNDER_COMPILE)
        return MePropFunction.apply(x, weight, bias, k, backend, unified, selection, sparse_grad, generator, counts)
    if torch._C._are_functorch_transforms_active():
        return _MePropFunctionWithJvp.apply(x, weight, bias, k, backend, unified, selection, sparse_grad, generator, counts)
    settings = (k, backend, unified, selection, sparse_grad, generator, counts)
    if _eager_apply is None or _is_wrapped(x) or _is_wrapped(weight) or (bias is not None and _is_wrapped(bias)):
        return _EagerMePropFunction.apply(x, weight, bias, settings)
    return _eager_apply(x, weight, bias, settings)


def _refuse_sparse_under_ddp(ddp, weight, bias) -> None:
    """Raise if ``ddp`` (the DistributedDataParallel whose forward is running) reduces
    ``weight`` or ``bias`` (a parameter it ignores is the caller's to reduce)."""
    params = getattr(ddp, "_module_parameters", None)
    reduced = params is None or any(
        p is t for p in params for t in (weight, bias) if t is not None and t.requires_grad
    )
    if reduced:
        raise RuntimeError(
            f"sparse_grad=True does not work under DistributedDataParallel: DDP all-reduces "
            f"gradients in dense buckets and cannot take the sparse gradient of this meProp "
            f"layer (weight {tuple(weight.shape)}); its backward would fail with 'Cannot "
            f"access storage of SparseTensorImpl'. Use sparse_grad=False: each rank then "
            f"keeps the top-k units of its own gradient, and the all-reduced weight gradient "
            f"has up to world_size x k non-zero rows"
        )


def _count(counts: Tensor, idx: Tensor | None, rows: int) -> None:
    """Add one backward's selections to ``counts`` (int64, ``(out + 1,)``): +1 to unit j
    for every row whose kept set holds j, and ``rows`` to the last entry. ``idx``: the
    unified set ``(k,)`` (every row keeps it), a per-row ``(M, k)`` set, or None when
    every unit is kept. Device operations only: no host sync."""
    if idx is None:
        counts.add_(rows)
        return
    flat = idx.reshape(-1)
    weight = rows if idx.dim() == 1 else 1
    counts.index_add_(0, flat, torch.full_like(flat, weight))
    counts[-1:].add_(rows)


def _unbatchable(selection: str, sparse: bool, counts) -> str | None:
    """The setting that torch's older vmap cannot batch, if any."""
    if selection == "random":
        return "selection='random'"  # its random draws
    if sparse:
        return "sparse_grad=True"  # sparse tensors
    if counts is not None:
        return "track_selection=True"  # the in-place counters
    return None


def _backward(ctx, grad_output: Tensor):
    """``(grad_x, grad_W, grad_b)`` of a meProp Function's backward (None where not
    needed); ``ctx.settings`` is ``(k, backend, unified, selection, sparse_grad,
    generator, counts)``."""
    if _any_autocast() and autocast_on(grad_output.device.type):
        # backward() called inside an autocast region: compute in the tensors' own
        # dtypes, as the forward's F.linear was (torch.amp.custom_bwd does the same).
        with torch.autocast(grad_output.device.type, enabled=False):
            return _backward(ctx, grad_output)
    x, weight = ctx.saved_tensors
    # (Dynamo traces this backward in a strict mode that refuses reading .layout; what it
    # compiles is never sparse, nor a batched tensor of torch's older vmap.)
    eager = not torch.compiler.is_compiling()
    if x is None:
        x = _stand_in(ctx.x_spec)
    elif eager and x.layout != torch.strided:  # a sparse input (needing no gradient): grad_W reads its rows
        x = x.to_dense()
    needs = ctx.needs_input_grad[:3]
    k, backend, unified, selection, sparse, generator, counts = ctx.settings
    batched = eager and reference.is_legacy_batched(grad_output)
    if batched:  # each batched grad_output its own backward, by the torch path, as under torch.func.vmap
        reference.refuse_legacy_batched("MePropLinear", _unbatchable(selection, sparse, counts))
        backend = "torch"
    if torch._C._are_functorch_transforms_active():
        # Under torch.func the gradients come from a Function of their own, which has a
        # vmap rule (vmap over a backward: each vmapped entry its own backward call) and
        # a backward (grad of grad) of its own.
        gx, gw, gb, _ = _MePropGrad.apply(grad_output, x, weight, *ctx.settings, needs)
        return gx, gw, gb
    if (
        backend == "torch" and unified and selection == "topk" and not sparse
        and k < weight.shape[0] and grad_output.dim() == 2 and x.dim() == 2
        and grad_output.is_cpu and counts is None and not torch.is_grad_enabled()
        and eager and not batched
    ):  # a backward with create_graph=True records the general route's ops (no out= there)
        return _cpu_unified_topk(grad_output, x, weight, k, needs)
    gx, gw, gb, _ = _gradients(grad_output, x, weight, k, backend, unified, selection, sparse, generator, counts, needs)
    return gx, gw, gb


def _cpu_unified_topk(grad: Tensor, x: Tensor, weight: Tensor, k: int, needs):
    """The common CPU case of :func:`_gradients` (unified top-k, ``k < out``, 2-D
    tensors, dense gradients, no counters), bit for bit the same numbers, with as few
    Python and torch operations as it takes: inside a training step each costs 5-25 us
    (code and data caches cold after the GEMMs), a tenth of a whole MNIST-sized layer's
    backward. What ``reference.select_topk`` and ``reference.unified_backward`` do,
    written out: calling ``reference.unified_topk_indices`` instead made each MNIST
    layer's backward 15-20 us slower inside training (interleaved A/B, 2 threads);
    ``torch.mm`` for ``@`` (same kernel, one dispatch fewer)."""
    need_x, need_w, need_b = needs
    scores = reference._abs_column_sums(grad)
    values, top = torch.topk(scores, k + 1)
    v = values.tolist()
    if v[k - 1] != v[k] and math.isfinite(v[0]):  # as in select_topk: no tie at k, no NaN/inf
        idx = top.narrow(0, 0, k)
    else:
        idx = reference.select_topk(scores, k, sort=False)
    g_s = grad.index_select(1, idx)
    gx = gw = gb = None
    if need_x:
        gx = torch.mm(g_s, weight.index_select(0, idx))
    if need_w:
        out_features, in_features = weight.shape
        if out_features * in_features * grad.element_size() < reference._LAZY_ZEROS_BYTES:
            # One pass over grad_W: the k product rows and a zero row below them, then
            # every row of grad_W gathered from those (an unselected unit's from the zero
            # row). Zeros then a scatter of the k rows write the kept rows twice, and
            # index_copy_ copies element by element, index_select row by row: 10-15%
            # of an MNIST layer's backward.
            rows = grad.new_zeros(k + 1, in_features)
            torch.mm(g_s.t(), x, out=rows.narrow(0, 0, k))
            gw = rows.index_select(0, _row_map(out_features, k, idx))
        else:  # lazily zeroed pages (see _weight_grad_zeros): the unselected rows cost nothing here
            gw = reference._weight_grad_zeros(weight.shape, grad)
            gw.index_copy_(0, idx, torch.mm(g_s.t(), x))
    if need_b:
        gb = grad.sum(0)
    return gx, gw, gb


_ROW_MAPS: dict = {}  # (out, k, device) -> (full(out, k), arange(k)), never written to


def _row_map(out_features: int, k: int, idx: Tensor) -> Tensor:
    """``(out,)`` int64: ``i`` at ``idx[i]``, ``k`` (the zero row) everywhere else."""
    key = (out_features, k, idx.device)
    base = _ROW_MAPS.get(key)
    if base is None:
        if len(_ROW_MAPS) >= 64:  # layers of many widths (meSimp shrinks them): keep it small
            _ROW_MAPS.clear()
        base = _ROW_MAPS[key] = (
            torch.full((out_features,), k, dtype=torch.long, device=idx.device),
            torch.arange(k, device=idx.device),
        )
    return base[0].index_copy(0, idx, base[1])


def _gradients(grad_output, x, weight, k, backend, unified, selection, sparse, generator, counts, needs):
    """meProp's gradients of ``F.linear(x, weight, bias)`` for ``grad_output``:
    ``(grad_x, grad_W, grad_b, idx)``, None where ``needs`` (three flags) says no, and
    ``idx`` the kept units: ``(k,)`` unified, ``(M, k)`` per row, None for all of them
    (``k >= out``)."""
    need_x, need_w, need_b = needs
    out_features, in_features = weight.shape
    # Views only where the input had other than two dimensions (a reshape costs
    # about a microsecond, and MNIST-sized backward passes take a few hundred).
    grad = grad_output if grad_output.dim() == 2 else grad_output.reshape(-1, out_features)
    x2d = x if x.dim() == 2 else x.reshape(-1, in_features)
    idx = None  # the kept units: (k,) unified, (M, k) per row, None for all of them
    if k >= out_features:
        run = reference.dense_sparse_backward if sparse else reference.dense_backward
        gx, gw, gb = run(grad, x2d, weight, need_input=need_x, need_weight=need_w, need_bias=need_b)
    elif backend == "triton" and not sparse:
        gx, gw, gb, idx = _triton_backward(unified, selection, generator, grad, x2d, weight, k, needs)
    else:
        if not unified:
            # Each row's set, in any order (topk's, or sorted where numpy selects): the products do not need it sorted.
            if selection == "topk":
                idx = reference.per_example_topk_indices(grad, k, sort=False)
            else:
                idx = reference.per_example_random_indices(
                    grad.shape[0], out_features, k, generator=generator,
                    device=grad.device, sort=False,
                )
            run = reference.per_example_sparse_backward if sparse else reference.per_example_backward
        else:
            if selection == "random":
                idx = reference.random_indices(out_features, k, generator=generator, device=grad.device)
            else:
                # Sorted only where the rows become a coalesced sparse gradient.
                idx = reference.unified_topk_indices(grad, k, sort=sparse)
            run = reference.unified_sparse_backward if sparse else reference.unified_backward
        gx, gw, gb = run(grad, x2d, weight, idx, need_input=need_x, need_weight=need_w, need_bias=need_b)
    # Counted where a selection decided something: a backward that computes neither
    # grad_x nor grad_W (only the bias's) counts nothing, on either backend.
    if counts is not None and (need_x or need_w) and (idx is None or idx.numel() > 0):
        _count(counts, idx, grad.shape[0])
    if gx is not None and gx.dim() != x.dim():
        gx = gx.reshape(x.shape)
    return gx, gw, gb, idx


class _MePropGrad(torch.autograd.Function):
    """meProp's gradients as a Function of ``(grad_output, x, weight)``: what
    ``MePropFunction.backward`` runs under ``torch.func`` transforms.

    Outputs ``(grad_x, grad_W, grad_b, idx)`` as :func:`_gradients`. ``vmap`` is the rule
    for a backward under ``torch.func.vmap`` (``vmap(grad(f))``, ``jacrev``): every
    vmapped entry is its own backward call, so in ``vmap(grad(f))`` over a batch each
    sample is a batch of its own and unified selection keeps that sample's own top-k.
    ``backward`` is the derivative of the gradients with the kept units held fixed (grad
    of grad), as autograd gives it through the ops of the eager backward; ``jvp`` is the
    same derivative in forward mode (``jacfwd(grad(f))``; dense gradients only).
    """

    @staticmethod
    def forward(grad_output, x, weight, k, backend, unified, selection, sparse, generator, counts, needs):
        return _gradients(grad_output, x, weight, k, backend, unified, selection, sparse, generator, counts, needs)

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        grad_output, x, weight, k, backend, unified, selection, sparse, *_ = inputs
        idx = outputs[3]
        if idx is not None:
            ctx.mark_non_differentiable(idx)
        ctx.sparse = sparse
        ctx.needs = inputs[-1]
        ctx.save_for_backward(grad_output, x, weight, idx)
        ctx.save_for_forward(grad_output, x, weight, idx)

    @staticmethod
    def backward(ctx, ggx, ggw, ggb, _gidx):
        grad_output, x, weight, idx = ctx.saved_tensors
        need_g, need_x, need_w = ctx.needs_input_grad[:3]
        out_features, in_features = weight.shape
        G = grad_output.reshape(-1, out_features)
        X = x.reshape(-1, in_features)
        keep = _kept(G, idx)
        Gm = G if keep is None else torch.where(keep, G, 0)
        ggx = None if ggx is None else ggx.reshape(-1, in_features)
        if ggw is not None and ggw.is_sparse:
            ggw = ggw.to_dense()
        if ggb is not None and ggb.is_sparse:
            ggb = ggb.to_dense()
        d_g = d_x = d_w = None
        if need_g:
            d_g = torch.zeros_like(G)
            if ggx is not None:
                d_g = d_g + ggx @ weight.t()
            if ggw is not None:
                d_g = d_g + X @ ggw.t()
            if keep is not None:
                d_g = torch.where(keep, d_g, 0)
            if ggb is not None:
                if ctx.sparse and keep is not None:
                    # A row-sparse bias gradient holds the kept units' sums only.
                    d_g = d_g + torch.where(keep.any(0, keepdim=True), ggb, 0)
                else:
                    d_g = d_g + ggb
            d_g = d_g.reshape(grad_output.shape)
        if need_x and ggw is not None:
            d_x = (Gm @ ggw).reshape(x.shape)
        if need_w and ggx is not None:
            d_w = Gm.t() @ ggx
        return d_g, d_x, d_w, None, None, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, t_g, t_x, t_w, *_):
        if ctx.sparse:
            raise NotImplementedError(
                "forward-mode AD over a sparse_grad=True meProp gradient is not supported "
                "(its gradients are sparse tensors); use sparse_grad=False, or reverse mode "
                "(jacrev / grad of grad)"
            )
        grad_output, x, weight, idx = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs
        out_features, in_features = weight.shape
        G = grad_output.reshape(-1, out_features)
        X = x.reshape(-1, in_features)
        keep = _kept(G, idx)
        Gm = G if keep is None else torch.where(keep, G, 0)
        # The gradients are bilinear in (G, x, W) for the kept units: grad_x = Gm W,
        # grad_W = Gm^T X, grad_b = sum_m G (dense); each tangent, one term per input
        # that has one.
        tG = None
        if t_g is not None:
            tG = t_g.reshape(-1, out_features)
            tG = tG if keep is None else torch.where(keep, tG, 0)
        t_gx = t_gw = t_gb = None
        if need_x and (tG is not None or t_w is not None):
            t_gx = tG @ weight if tG is not None else None
            if t_w is not None:
                t_gx = Gm @ t_w if t_gx is None else t_gx + Gm @ t_w
            t_gx = t_gx.reshape(x.shape)
        if need_w and (tG is not None or t_x is not None):
            t_gw = tG.t() @ X if tG is not None else None
            if t_x is not None:
                more = Gm.t() @ t_x.reshape(-1, in_features)
                t_gw = more if t_gw is None else t_gw + more
        if need_b and t_g is not None:
            t_gb = t_g.reshape(-1, out_features).sum(0)
        return t_gx, t_gw, t_gb, None

    @staticmethod
    def vmap(info, in_dims, grad_output, x, weight, k, backend, unified, selection, sparse, generator, counts, needs):
        if sparse:
            raise NotImplementedError(SPARSE_UNDER_VMAP)
        if selection == "random" and info.randomness == "error":
            raise RuntimeError(RANDOM_UNDER_VMAP)
        return _vmapped_gradients(
            info.batch_size, info.randomness, in_dims[:3], grad_output, x, weight,
            k, unified, selection, generator, counts, needs,
        )


def _kept(G: Tensor, idx):
    """The kept (row, unit) entries of a 2-D ``G`` for a selection ``idx`` ((k,) unified,
    (M, k) per row) as a bool mask broadcastable to G's shape; None: all of them (``idx``
    None). Out-of-place ops only, so this runs under vmap too."""
    if idx is None:
        return None
    if idx.dim() == 1:
        return G.new_zeros(1, G.shape[1], dtype=torch.bool).scatter(1, idx.unsqueeze(0), True)
    return G.new_zeros(G.shape, dtype=torch.bool).scatter(1, idx, True)


#: The refusals of a vmapped meProp backward (MePropLinear's, MePropConv1D's, MePropLSTM's).
SPARSE_UNDER_VMAP = (
    "sparse_grad=True cannot run under torch.func.vmap: per-sample gradients are "
    "dense tensors with a batch dimension, which a sparse gradient cannot be; use "
    "sparse_grad=False (the unselected rows are zero)"
)
RANDOM_UNDER_VMAP = (
    "selection='random' under torch.func.vmap draws random units, which vmap's "
    "default randomness='error' refuses; pass randomness='different' (each "
    "vmapped entry draws its own units, in order, as a loop over the entries "
    "would) or randomness='same' (one draw shared by all entries) to vmap"
)


def _batch_first(t: Tensor, dim, size: int) -> Tensor:
    """``t`` with its vmapped dimension ``dim`` first (expanded to ``size`` when None)."""
    return t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)


def _vmapped_gradients(B, randomness, dims, grad_output, x, weight, k, unified, selection, generator, counts, needs):
    """meProp's gradients for ``B`` vmapped entries, each its own backward call: the
    torch path, for any backend (the kernels take one call at a time). Outputs and
    output dims as ``vmap`` rules return them."""
    need_x, need_w, need_b = needs
    g_dim, x_dim, w_dim = dims
    out_features, in_features = weight.shape[-2:]
    G = _batch_first(grad_output, g_dim, B)
    lead = G.shape[1:-1]  # an entry's leading dims (x's and grad_output's alike)
    M = math.prod(lead)  # rows per entry
    G = G.reshape(B, M, out_features)
    X = _batch_first(x, x_dim, B).reshape(B, M, in_features)
    W = weight.movedim(w_dim, 0) if w_dim is not None else weight  # (B, out, in) or (out, in)
    device = G.device
    idx = None
    gx = gw = gb = None
    if k >= out_features:
        gx = G @ W if need_x else None
        gw = G.transpose(1, 2) @ X if need_w else None
    elif unified:
        if selection == "topk":
            # Each entry's scores sum_m |G[b, m, j]| (fp32, or fp64 for fp64), NaN and
            # inf as +inf; a row-wise top-k of them is each entry's own unified top-k,
            # ties to the lower index.
            score_dtype = torch.float64 if G.dtype == torch.float64 else torch.float32
            scores = G.abs().sum(1, dtype=score_dtype)
            idx = reference.per_example_topk_indices(scores, k)
        elif randomness == "same":
            idx = reference.random_indices(out_features, k, generator=generator, device=device).expand(B, k)
        else:
            idx = torch.stack([
                reference.random_indices(out_features, k, generator=generator, device=device) for _ in range(B)
            ])
        g_s = G.gather(2, idx.unsqueeze(1).expand(B, M, k))  # (B, M, k)
        if need_x:
            if W.dim() == 2:
                w_s = W[idx]  # (B, k, in)
            else:
                w_s = W.gather(1, idx.unsqueeze(2).expand(B, k, in_features))
            gx = g_s @ w_s
        if need_w:
            gw = G.new_zeros(B, out_features, in_features)
            gw.scatter_(1, idx.unsqueeze(2).expand(B, k, in_features), g_s.transpose(1, 2) @ X)
    else:
        if selection == "topk":
            # Row-local: the same sets as each entry's own call.
            idx = reference.per_example_topk_indices(G.reshape(B * M, out_features), k).reshape(B, M, k)
        elif randomness == "same":
            idx = reference.per_example_random_indices(M, out_features, k, generator=generator, device=device)
            idx = idx.expand(B, M, k)
        else:
            idx = torch.stack([
                reference.per_example_random_indices(M, out_features, k, generator=generator, device=device)
                for _ in range(B)
            ])
        Gm = torch.zeros_like(G).scatter_(2, idx, G.gather(2, idx))
        gx = Gm @ W if need_x else None
        gw = Gm.transpose(1, 2) @ X if need_w else None
    if need_b:
        gb = G.sum(1)
    if counts is not None and (need_x or need_w):
        if idx is None:
            counts.add_(B * M)
        else:
            flat = idx.reshape(-1)
            counts.index_add_(0, flat, torch.full_like(flat, M if unified else 1))
            counts[-1:].add_(B * M)
    if gx is not None:
        gx = gx.reshape(B, *lead, in_features)
    outputs = (gx, gw, gb, idx)
    return outputs, tuple(None if t is None else 0 for t in outputs)


def _triton_backward(unified, selection, generator, grad, x2d, weight, k, needs):
    """The Triton kernels' backward (CUDA tensors, or the interpreter): dense gradients,
    and the kept units (as ``_gradients`` takes them; empty where none were selected)."""
    from . import triton_ops

    out_features = weight.shape[0]
    if selection == "random":
        if unified:
            idx = reference.random_indices(out_features, k, generator=generator, device=grad.device)
            return (*triton_ops.unified_backward_from_indices(grad, x2d, weight, idx, *needs, check_indices=False), idx)
        idx = reference.per_example_random_indices(
            grad.shape[0], out_features, k, generator=generator, device=grad.device
        )
        return (*triton_ops.per_example_backward_from_indices(grad, x2d, weight, idx, *needs, check_indices=False), idx)
    if unified:
        return triton_ops.unified_topk_backward(grad, x2d, weight, k, *needs, return_indices=True)
    return triton_ops.per_example_topk_backward(grad, x2d, weight, k, *needs, return_indices=True)


def meprop_linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    k,
    unified: bool = True,
    selection: str = "topk",
    sparse_grad: bool = False,
    backend: str = "auto",
    generator: torch.Generator | None = None,
    counts: Tensor | None = None,
) -> Tensor:
    """``F.linear(input, weight, bias)`` whose backward keeps only the top-k output units.

    Args:
        input: ``(..., in_features)``, any leading shape (1-D included).
        weight: ``(out_features, in_features)``.
        bias: ``(out_features,)`` or None. Its gradient is always dense and exact.
        k: an int >= 1 (a number of output units; values >= out_features give the dense
            gradient) or a float in (0, 1] (a fraction of out_features, rounded up).
        unified: True: one set of units for all leading positions (scored by
            ``sum |grad|`` per unit); False: a set per row (by ``|grad[m, :]|``), the
            paper's original per-example meProp.
        selection: ``"topk"`` (by gradient magnitude) or ``"random"`` (a uniform random
            k-subset per call, or per row, independent of the gradient).
        sparse_grad: False: dense weight and bias gradients (unselected rows zero).
            True: sparse COO gradients holding only the selected rows (the bias gradient
            restricted to the same rows), for SGD, Adagrad or SparseAdam.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        generator: the ``torch.Generator`` that ``selection="random"`` draws from (torch's
            default generator of the tensors' device when None); it must live on the
            tensors' device.
        counts: None, or an int64 tensor of shape ``(out_features + 1,)`` on the
            tensors' device that each backward adds its selection statistics to (meSimp):
            ``counts[j]`` += the number of rows whose kept set holds unit j,
            ``counts[-1]`` += the number of rows. Device operations only (no host
            sync). ``MePropLinear(track_selection=True)`` keeps one.

    Under ``torch.func.vmap`` each vmapped entry is its own call: in ``vmap(grad(f))``
    over a batch every sample keeps its own top-k (per-sample meProp gradients).
    ``selection="random"`` there needs vmap's ``randomness="different"`` (each entry draws
    its own units, in entry order, as a loop would) or ``"same"`` (one shared draw);
    ``sparse_grad=True`` is refused under vmap, and under DistributedDataParallel.

    Every argument is checked before any work is done.
    """
    check_options(unified=unified, selection=selection, sparse_grad=sparse_grad, backend=backend)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    if isinstance(weight, Tensor) and weight.dim() == 2:
        k_units = resolve_k(k, weight.shape[0])
    else:
        k_units = None  # check_linear_args names the bad weight below

    dtype = _autocast_dtype(input)
    if dtype is not None and sparse_grad:
        raise sparse_under_autocast(dtype)
    if dtype is not None and isinstance(weight, Tensor):
        # Do autocast's cast here, differentiably, and save the low-precision copies.
        def cast(t):
            # As autocast does for nn.Linear: float64 is left alone.
            if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64:
                return t.to(dtype)
            return t

        input, weight, bias = cast(input), cast(weight), cast(bias)
    check_linear_args(input, weight, bias)
    if counts is not None:
        _check_counts(counts, weight)
    if generator is not None and generator.device.type != input.device.type:
        raise ValueError(
            f"generator lives on '{generator.device}' but the tensors on '{input.device}'; "
            f"pass a torch.Generator(device='{input.device.type}')"
        )
    resolved = resolve_backend(backend, input.device, input.dtype)
    if backend == "triton" and sparse_grad:
        raise NotImplementedError(
            "backend='triton' gives dense gradients only so far; sparse_grad=True runs on "
            "backend='torch' (or 'auto'), on CUDA tensors too"
        )

    if not needs_backward(input, weight, bias):
        return F.linear(input, weight, bias)
    check_strided(input, weight, bias, sparse_input=True)  # F.linear takes more than the backward
    args = (input, weight, bias, k_units, resolved, unified, selection, sparse_grad, generator, counts)
    if dtype is None:
        return apply_meprop(*args)
    with torch.autocast(input.device.type, enabled=False):
        return apply_meprop(*args)


def _check_counts(counts, weight: Tensor) -> None:
    want = (weight.shape[0] + 1,)
    if (
        not isinstance(counts, Tensor) or counts.dtype != torch.int64 or tuple(counts.shape) != want
        or counts.device != weight.device
    ):
        got = (
            f"{counts.dtype} of shape {tuple(counts.shape)} on '{counts.device}'"
            if isinstance(counts, Tensor) else type(counts).__name__
        )
        raise ValueError(
            f"counts must be an int64 tensor of shape {want} (out_features + 1) on "
            f"'{weight.device}'; got {got}"
        )
