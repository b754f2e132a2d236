"""meProp for an LSTM layer: one autograd Function over a whole sequence (torch path).

Notation (the README's "LSTM"): one layer and direction, input ``x_t: (B, in)``,
state ``h_t, c_t: (B, H)``, gate pre-activations
``a_t = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh`` of ``4H`` values in torch's gate order
(input, forget, cell, output; ``H`` each).

Forward: on a CPU when a backward may follow, step by step (the input projection of all
steps in one GEMM, then one ``addmm`` per step), keeping the activated gates and cell
states for the backward: ``nn.LSTM``'s outputs up to rounding. Otherwise torch's own
fused LSTM (``torch.lstm``), ``nn.LSTM``'s outputs exactly; the backward then recomputes
the gates from the known h sequence (one GEMM over all steps for each weight, the cell
states by an element-wise loop). Backward: a loop from the last
step back: the element-wise parts exactly, and at each step, for each of the four
gates, only the top-k of that gate's ``H`` gradients ``da_t`` are kept (scored by
``sum_b |da_t[b, j]|``, unified over the batch at that step; per row with
``unified=False``; a uniform random k-subset per gate with ``selection="random"``). Ties
go to the lower index, NaN and inf count as +inf. The recurrent gradient
``dh_{t-1} = da_t[:, S_t] @ W_hh[S_t, :]`` uses the kept rows only; after the loop
``dx``, ``dW_ih`` and ``dW_hh`` are formed from the kept entries of all steps at once
(the per-row products of per-example meProp, ``reference.per_example_backward``), and the
bias gradients from every ``da_t`` (dense and exact). ``k >= H`` is ``nn.LSTM``'s
backward. No ``(T x 4H x in)`` temporary is made; the kept gradients are held as
``(T*B, 4k)`` values and indices.

``torch.func``'s reverse-mode transforms run it as they run ``MePropLinear``: ``grad`` and
``vjp`` give the ordinary backward's gradients, and under ``vmap`` each vmapped entry is
its own forward and backward call. Forward mode and grad of grad are refused by name.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from .functional import (
    RANDOM_UNDER_VMAP, SPARSE_UNDER_VMAP, _any_autocast, _wrapped_requires_grad, autocast_on, jit_tracing,
)

__all__ = ["lstm_layer", "ProductTimer"]


class ProductTimer:
    """Seconds spent in an LSTM backward's matrix products (the paper's "backprop time":
    the recurrent ``dh_{t-1}`` product of every step, and ``dx``, ``dW_ih``, ``dW_hh``),
    the element-wise parts and the selection left out. Active inside ``with timer:``
    (one at a time); on CUDA the device is synchronised around each product.

        timer = ProductTimer()
        with timer:
            loss.backward()
        timer.seconds
    """

    active: "ProductTimer | None" = None

    def __init__(self) -> None:
        self.seconds = 0.0
        self._t0 = 0.0

    def __enter__(self) -> "ProductTimer":
        ProductTimer.active = self
        return self

    def __exit__(self, *exc) -> None:
        ProductTimer.active = None

    def start(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self._t0 = time.perf_counter()

    def stop(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds += time.perf_counter() - self._t0


class _Settings:
    """What a layer's backward needs besides tensors (set when the forward is recorded)."""

    __slots__ = ("k", "unified", "selection", "generator", "sparse_grad", "dirs", "has_bias",
                 "batch_sizes", "ragged", "n_params")

    def __init__(self, k, unified, selection, generator, sparse_grad, dirs, has_bias, batch_sizes, n_params):
        self.k, self.unified, self.selection, self.generator = k, unified, selection, generator
        self.sparse_grad, self.dirs, self.has_bias, self.n_params = sparse_grad, dirs, has_bias, n_params
        self.batch_sizes, self.ragged = batch_sizes, _ragged(batch_sizes)


_CREATE_GRAPH = (
    "MePropLSTM's backward cannot be differentiated (create_graph=True, e.g. for a "
    "gradient penalty, or grad of grad) yet; MePropLinear's can"
)
_FORWARD_MODE = (
    "forward-mode differentiation (torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad) "
    "of MePropLSTM is not supported; use reverse mode (backward, grad, vjp, jacrev), or nn.LSTM"
)


class _LSTMLayer(torch.autograd.Function):
    """One layer, one or both directions: ``params`` are ``(w_ih, w_hh[, b_ih, b_hh])`` per
    direction; ``h0``, ``c0``: ``(dirs, B, H)``. The forward is one ``torch.lstm`` call
    for the layer (both directions at once, as ``nn.LSTM`` runs it), or the step-by-step
    one keeping the gates, which come back as extra (non-differentiable) outputs so that
    the backward can take them. ``torch.func`` transforms run it: under ``vmap`` each
    vmapped entry is its own call (:meth:`vmap`), as for ``MePropLinear``."""

    @staticmethod
    def forward(x, h0, c0, batch_sizes, k, unified, selection, generator, bidirectional, has_bias,
                keep_gates, sparse_grad, *params):
        # batch_sizes is on the CPU and sorted by decreasing size: ragged unless all equal
        dirs = 2 if bidirectional else 1
        if keep_gates and not _ragged(batch_sizes):
            out, h_n, c_n, kept = _forward_keeping_gates(x, h0, c0, params, dirs, has_bias)
            return (out, h_n, c_n, *kept)
        if batch_sizes is None:
            return torch.lstm(x, (h0, c0), list(params), has_bias, 1, 0.0, False, bidirectional, False)
        # packed: x is the PackedSequence's data
        return torch.lstm(x, batch_sizes, (h0, c0), list(params), has_bias, 1, 0.0, False, bidirectional)

    @staticmethod
    def setup_context(ctx, inputs, output):
        out, _h_n, _c_n, *kept = output
        if kept:
            ctx.mark_non_differentiable(*kept)
        _save(ctx, inputs, out, kept)

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn, *_kept):
        saved = ctx.saved_tensors
        # Under torch.func: a transform is active (grad, vmap, jacrev), or the tensors are
        # its wrappers (the function torch.func.vjp returns, called afterwards).
        transformed = torch._C._are_functorch_transforms_active() or torch.is_grad_enabled() and any(
            t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in (d_out, d_hn, d_cn, *saved)
        )
        if torch.is_grad_enabled() and not transformed:  # create_graph=True: refused up front
            raise NotImplementedError(_CREATE_GRAPH)
        if any(d is not None and reference.is_legacy_batched(d) for d in (d_out, d_hn, d_cn)):
            reference.refuse_legacy_batched("MePropLSTM", "")  # its out= operations
        device = next(d for d in (d_out, d_hn, d_cn) if d is not None).device
        if _any_autocast() and autocast_on(device.type):
            # backward() called inside an autocast region: compute in the tensors' own
            # dtypes, as the forward was (MePropLinear's backward does the same).
            with torch.autocast(device.type, enabled=False):
                return _LSTMLayer.backward(ctx, d_out, d_hn, d_cn, *_kept)
        s = ctx.settings
        needs = (ctx.needs_input_grad[0], tuple(ctx.needs_input_grad[12:]))
        if transformed:
            # Under torch.func (grad runs the backward with create_graph=True, vmap and
            # jacrev batch it): the backward as a Function of its own, whose vmap rule
            # takes one entry at a time and whose derivative is refused by name.
            grads = _LSTMLayerGrad.apply(s, needs, d_out, d_hn, d_cn, *saved)
        else:
            grads = _layer_backward(s, needs, d_out, d_hn, d_cn, *saved)
        dx, dh0, dc0, *dparams = grads
        return (dx, dh0, dc0, None, None, None, None, None, None, None, None, None, *dparams)

    @staticmethod
    def vmap(info, in_dims, x, h0, c0, batch_sizes, k, unified, selection, generator, bidirectional,
             has_bias, keep_gates, sparse_grad, *params):
        # (sparse_grad is refused by the backward's vmap rule, where a vmapped backward
        # would need it; a vmapped inference, or a vmapped forward back-propagated by an
        # ordinary .backward(), runs)
        _refuse_no_entries(info)
        dims = (in_dims[0], in_dims[1], in_dims[2], *in_dims[12:])
        # One call per entry: where ordinary autograd records this forward (a vmapped
        # forward, then .backward() outside torch.func), each entry's backward is its own.
        results = []
        for i in range(info.batch_size):
            x_i, h0_i, c0_i, *p_i = _entry((x, h0, c0, *params), dims, i)
            results.append(_LSTMLayer.apply(
                x_i, h0_i, c0_i, batch_sizes, k, unified, selection, generator, bidirectional, has_bias,
                keep_gates, sparse_grad, *p_i,
            ))
        return _stacked(results)

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(_FORWARD_MODE)


class _EagerLSTMLayer(torch.autograd.Function):
    """:class:`_LSTMLayer` for calls outside ``torch.func`` transforms: the same forward
    and backward, in the older form, whose ``apply`` does not bind its arguments to the
    forward's signature (``inspect``) on every call as a ``setup_context`` Function's does."""

    @staticmethod
    def jvp(ctx, *tangents):  # torch.autograd.forward_ad's dual tensors
        raise NotImplementedError(_FORWARD_MODE)

    @staticmethod
    def forward(ctx, *args):
        out, h_n, c_n, *kept = _LSTMLayer.forward(*args)
        _save(ctx, args, out, kept)  # the gates saved as they are, not returned
        return out, h_n, c_n

    backward = _LSTMLayer.backward


class _LSTMLayerGrad(torch.autograd.Function):
    """The layer's meProp backward as a Function, for ``torch.func``: its ``vmap`` rule
    runs each vmapped entry as its own backward (per-sample gradients, ``jacrev``), and
    differentiating it (grad of grad) is refused by name."""

    @staticmethod
    def forward(s, needs, d_out, d_hn, d_cn, *saved):
        return _layer_backward(s, needs, d_out, d_hn, d_cn, *saved)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(_CREATE_GRAPH)

    @staticmethod
    def vmap(info, in_dims, s, needs, d_out, d_hn, d_cn, *saved):
        if s.sparse_grad:
            raise NotImplementedError(SPARSE_UNDER_VMAP)
        _refuse_no_entries(info)
        tensors, dims = (d_out, d_hn, d_cn, *saved), in_dims[2:]
        same = False
        if s.selection == "random":
            if info.randomness == "error":
                raise RuntimeError(RANDOM_UNDER_VMAP)
            same = info.randomness == "same"
            device = next(t for t in tensors if t is not None).device
            gen = s.generator if s.generator is not None else _default_generator(device)
            state = gen.get_state()
        results = []
        for i in range(info.batch_size):
            if same:
                gen.set_state(state)  # every entry draws what the first one drew
            results.append(_LSTMLayerGrad.apply(s, needs, *_entry(tensors, dims, i)))
        return _stacked(results)


def _save(ctx, inputs, out, kept) -> None:
    (x, h0, c0, batch_sizes, k, unified, selection, generator, bidirectional, has_bias,
     _keep, sparse_grad, *params) = inputs
    ctx.set_materialize_grads(False)  # no zero tensors for the outputs a loss leaves out
    ctx.save_for_backward(x, h0, c0, out, *params, *kept)
    ctx.settings = _Settings(k, unified, selection, generator, sparse_grad, 2 if bidirectional else 1, has_bias,
                             batch_sizes, len(params))


def _refuse_no_entries(info) -> None:
    if info.batch_size == 0:
        raise ValueError("MePropLSTM under torch.func.vmap needs at least one vmapped entry; got a vmapped "
                         "dimension of size 0")


def _ragged(batch_sizes) -> bool:
    return batch_sizes is not None and int(batch_sizes[0]) != int(batch_sizes[-1])


def _entry(tensors, dims, i: int) -> list:
    """Vmapped entry ``i`` of ``tensors`` (``dims``: each one's vmapped dimension, None
    for a tensor shared by every entry, or for None)."""
    return [t if d is None or t is None else t.select(d, i) for t, d in zip(tensors, dims)]


def _stacked(results: list):
    """The entries' outputs stacked along a new first dimension, and their out_dims."""
    outs = tuple(None if r[0] is None else torch.stack(r) for r in zip(*results))
    return outs, tuple(None if t is None else 0 for t in outs)


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


def _layer_backward(s: _Settings, needs, d_out, d_hn, d_cn, x, h0, c0, out, *rest):
    """The layer's meProp backward: ``(dx, dh0, dc0, *dparams)`` (None where ``needs``,
    ``(need_x, need per parameter)``, says a gradient is not needed)."""
    params, kept = rest[:s.n_params], rest[s.n_params:]
    per = 4 if s.has_bias else 2
    H = h0.shape[2]
    need_x, need_params = needs
    active = None
    packed_x = None
    if s.batch_sizes is not None and not s.ragged:  # every sequence as long: (T, B) as it is
        B = h0.shape[1]
        x, out = x.view(-1, B, x.shape[1]), out.view(-1, B, out.shape[1])
        d_out = None if d_out is None else d_out.reshape(-1, B, d_out.shape[1])
        packed_x = x
    elif s.batch_sizes is not None:  # work on the padded (T, B) layout, inactive steps masked
        bs = s.batch_sizes.to(x.device)
        active = torch.arange(h0.shape[1], device=x.device).unsqueeze(0) < bs.unsqueeze(1)  # (T, B)
        packed_x = x
        x, out = _padded(x, active), _padded(out, active)
        d_out = None if d_out is None else _padded(d_out, active)
    dx = None
    dh0, dc0, dparams = [], [], []
    for d in range(s.dirs):
        w_ih, w_hh, *bias = params[d * per:(d + 1) * per]
        b_ih, b_hh = bias if bias else (None, None)
        flip = (lambda t: t.flip(0)) if d else (lambda t: t)
        half = slice(d * H, (d + 1) * H)
        g = _direction_backward(
            s, flip(x), h0[d], c0[d], w_ih, w_hh, b_ih, b_hh, flip(out[..., half]),
            None if d_out is None else flip(d_out[..., half]),
            None if d_hn is None else d_hn[d], None if d_cn is None else d_cn[d], need_x,
            None if active is None else flip(active), kept[3 * d:3 * d + 3] if kept else None,
        )
        gx, gh, gc, gw_ih, gw_hh, gb = g
        if need_x:
            dx = flip(gx) if dx is None else dx + flip(gx)
        dh0.append(gh)
        dc0.append(gc)
        if bias:
            gb2 = gb.clone()
            if s.sparse_grad:  # exact, so every row: one sparse optimizer can own them all
                rows = torch.arange(gb.shape[0], device=gb.device)
                gb = reference.rows_to_sparse(rows, gb, gb.shape[0])
                gb2 = reference.rows_to_sparse(rows, gb2, gb2.shape[0])
        dparams += [gw_ih, gw_hh] + ([gb, gb2] if bias else [])
    if active is not None and need_x:
        dx = dx[active]  # back to the packed layout
    elif packed_x is not None and need_x:
        dx = dx.view(-1, dx.shape[2])
    return (dx, torch.stack(dh0), torch.stack(dc0), *(p if need else None for p, need in zip(dparams, need_params)))


def _forward_keeping_gates(x, h0, c0, params, dirs: int, has_bias: bool):
    """The layer's forward step by step, keeping what the backward needs: per direction
    the activated gates ``(T, B, 4, H)``, the cell states and their tanh (in the
    direction's time order). ``x``: ``(T, B, in)``, or a PackedSequence's data whose
    sequences are all as long (then ``(T * B, in)``, and so is the output)."""
    B = h0.shape[1]
    packed = x.dim() == 2
    xs = x.view(-1, B, x.shape[1]) if packed else x
    per = len(params) // dirs
    outs, h_n, c_n, kept = [], [], [], []
    for d in range(dirs):
        w_ih, w_hh, *bias = params[d * per:(d + 1) * per]
        xd = xs.flip(0) if d else xs
        out, h, c, gates, cs, tanh_cs = _direction_forward(xd, h0[d], c0[d], w_ih, w_hh, *bias)
        outs.append(out.flip(0) if d else out)
        h_n.append(h)
        c_n.append(c)
        kept += [gates, cs, tanh_cs]
    out = outs[0] if dirs == 1 else torch.cat(outs, 2)
    if packed:
        out = out.view(-1, out.shape[2])
    return out, torch.stack(h_n), torch.stack(c_n), tuple(kept)


def _direction_forward(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None):
    """One direction over ``x: (T, B, in)``: ``(out, h_T, c_T, gates, c, tanh_c)``; the
    input projection of all steps in one GEMM, then per step one ``addmm`` with
    ``W_hh`` and the element-wise cell."""
    T, B, _ = x.shape
    H = w_hh.shape[1]
    bias = None if b_ih is None else b_ih + b_hh
    gates = _input_projection(x, w_ih, bias).view(T, B, 4, H)
    out = x.new_empty(T, B, H)
    cs, tanh_cs = torch.empty_like(out), torch.empty_like(out)
    w_hh_t = w_hh.t()
    h_t, c_t = h0, c0
    for a4, c_out, tc_out, h_out in zip(gates.unbind(0), cs.unbind(0), tanh_cs.unbind(0), out.unbind(0)):
        a = a4.view(B, 4 * H)
        a.addmm_(h_t, w_hh_t)
        g = a4[:, 2].tanh()
        a.sigmoid_()
        a4[:, 2] = g
        c_t = torch.addcmul(a4[:, 1] * c_t, a4[:, 0], g, out=c_out)
        h_t = torch.mul(a4[:, 3], torch.tanh(c_t, out=tc_out), out=h_out)
    return out, h_t, c_t, gates, cs, tanh_cs


def _input_projection(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``x @ w.T + b`` for ``x: (T, B, in)``, in the same bits whether or not ``w`` requires
    grad: on a non-contiguous ``x`` (a ``batch_first`` input seen as ``(T, B, in)``)
    ``F.linear`` folds the steps into one ``mm`` for a ``w`` that requires grad and runs a
    ``bmm`` otherwise, and eager calls see the Parameter where ``torch.func`` transforms
    see an unwrapped tensor. That fold, for every ``w``."""
    if x.is_contiguous():
        return F.linear(x, w, b)
    T, B, n = x.shape
    out = torch.mm(x.reshape(T * B, n), w.t()).view(T, B, w.shape[0])
    return out if b is None else out.add_(b)


def _padded(data: Tensor, active: Tensor) -> Tensor:
    """A PackedSequence's ``data`` in the padded ``(T, B, ...)`` layout (zeros where a
    sequence has ended): packed rows are time-major, so a boolean row-major assignment
    puts each where it belongs."""
    out = data.new_zeros((*active.shape, *data.shape[1:]))
    out[active] = data
    return out


def _select(da: Tensor, k: int, st, rev: Tensor) -> Tensor:
    """The kept units of one step's ``da: (B, 4, H)``: ``(R, 4, k)`` indices into each
    gate's ``H`` (``R`` = 1 unified, ``B`` per example), in no particular order. Ties to
    the lower index, NaN and inf as +inf: for fp32/fp16/bf16 each score's bit pattern
    (non-negative floats order like their bits read as integers) is packed with the
    reversed unit index into a unique int64 key, so ``topk`` has no ties to break."""
    B, _, H = da.shape
    if st.selection == "random":
        R = 1 if st.unified else B
        idx = reference.per_example_random_indices(R * 4, H, k, generator=st.generator, device=da.device, sort=False)
        return idx.view(R, 4, k)
    if da.dtype == torch.float64:
        s = da.abs().sum(0, keepdim=True) if st.unified else da.abs()
        s.nan_to_num_(nan=math.inf, posinf=math.inf)
        return torch.sort(s, dim=2, descending=True, stable=True).indices[..., :k]
    if st.unified and B != 1:  # B = 0 too (an empty batch): all-zero scores, one set
        s = da.abs().sum(0, keepdim=True, dtype=torch.float32)
        bits = s.nan_to_num_(nan=math.inf, posinf=math.inf).view(torch.int32)
    else:  # |da| as bits: the sign bit cleared, every NaN pattern clamped to inf's
        s = da if da.dtype == torch.float32 else da.float()
        bits = s.view(torch.int32).bitwise_and(0x7FFFFFFF).clamp_max_(0x7F800000)
    return torch.add(rev, bits, alpha=1 << 32).topk(k, dim=2, sorted=False).indices


def _direction_backward(st, x, h0, c0, w_ih, w_hh, b_ih, b_hh, out, d_out, d_hn, d_cn, need_x, active=None,
                        kept=None):
    """The meProp backward of one direction over ``x: (T, B, in)`` (time in the order the
    direction runs): ``(dx, dh0, dc0, dW_ih, dW_hh, db)``. ``active``: ``(T, B)`` bool,
    False where a (packed) sequence has no step: there the state passes unchanged.

    Everything that does not depend on the incoming gradient is computed for all steps
    at once before the loop (the gates, the cell states, and the factors ``da`` is made
    of), so a step of the loop is a handful of operations: ``dc``, ``da`` (two products),
    the selection and the recurrent product. ``kept``: the forward's ``(gates, c,
    tanh(c))`` in this direction's time order (gates activated, ``(T, B, 4, H)``), or
    None to recompute them."""
    T, B, n_in = x.shape
    H = w_hh.shape[1]
    k = min(st.k, H)
    dense = k >= H
    h_prev = torch.cat([h0.unsqueeze(0), out[:-1]], 0)  # (T, B, H)
    if active is not None:  # a step after an inactive one starts from h0 (reversed packed)
        before = torch.cat([active.new_zeros(1, B), active[:-1]], 0).unsqueeze(2)
        h_prev = torch.where(before, h_prev, h0.unsqueeze(0))
    if kept is not None:  # the forward's own (never with inactive steps)
        a, c, tanh_c = kept
        i, f, g, o = a.unbind(2)
        f_eff = f
    else:  # the gates, recomputed: one GEMM per weight over all steps
        a = _input_projection(x, w_ih, b_ih)
        a.view(T * B, 4 * H).addmm_(h_prev.reshape(T * B, H), w_hh.t())
        if b_hh is not None:
            a += b_hh
        a = a.view(T, B, 4, H)
        g = a[:, :, 2].tanh()
        a.sigmoid_()
        i, f, o = a[:, :, 0], a[:, :, 1], a[:, :, 3]
        ig = i * g
        if active is not None:  # inactive steps: c passes unchanged (f = 1, nothing added)
            act = active.unsqueeze(2).to(a.dtype)
            ig *= act
            f_eff = torch.where(active.unsqueeze(2), f, 1.0)
        else:
            f_eff = f
        c = torch.empty_like(ig)
        c_t = c0
        for ig_t, f_t, c_out in zip(ig.unbind(0), f_eff.unbind(0), c.unbind(0)):
            c_t = torch.addcmul(ig_t, f_t, c_t, out=c_out)
        tanh_c = c.tanh()
    c_prev = torch.cat([c0.unsqueeze(0), c[:-1]], 0)
    # da_t = [dc_t * fac_i, dc_t * fac_f, dc_t * fac_g, dh_t * fac_o];
    # dc_t = dc_{t+1} f_{t+1} + dh_t * oc_t
    fac = torch.empty_like(a)
    torch.mul(g, i * (1 - i), out=fac[:, :, 0])
    torch.mul(c_prev, f * (1 - f), out=fac[:, :, 1])
    torch.mul(i, 1 - g * g, out=fac[:, :, 2])
    torch.mul(tanh_c, o * (1 - o), out=fac[:, :, 3])
    oc = o * (1 - tanh_c * tanh_c)
    keep = None
    if active is not None:
        fac *= act.unsqueeze(2)
        oc *= act
        keep = (1 - act).unbind(0)  # 1 where the state passes unchanged

    da_all = torch.empty((T, B, 4, H), dtype=fac.dtype, device=fac.device)
    kept = 4 * (H if dense else k)
    R = 1 if st.unified else B
    idx = None if dense else torch.empty((T, R, 4, k), dtype=torch.int64, device=fac.device)
    vals = None if dense else torch.empty((T, B, kept), dtype=fac.dtype, device=fac.device)
    rev = torch.arange(H - 1, -1, -1, device=fac.device)
    offsets = torch.arange(0, 4 * H, H, device=fac.device).view(1, 4, 1)
    if d_out is None:
        d_out = torch.zeros_like(out)
    d_outs = d_out.unbind(0)
    dh = d_outs[T - 1] if d_hn is None else d_hn + d_outs[T - 1]
    dc = d_cn if d_cn is not None else torch.zeros_like(c0)
    timer = ProductTimer.active
    facs, ocs, fs, das = fac.unbind(0), oc.unbind(0), f_eff.unbind(0), da_all.unbind(0)
    for t in range(T - 1, -1, -1):
        fac_t, da4 = facs[t], das[t]
        dc = torch.addcmul(dc, dh, ocs[t])
        torch.mul(fac_t[:, :3], dc.unsqueeze(1), out=da4[:, :3])
        torch.mul(fac_t[:, 3], dh, out=da4[:, 3])
        dc = dc * fs[t]
        da = da4.view(B, 4 * H)
        if dense:
            if timer is not None:
                timer.start(da.device)
            dh_new = torch.addmm(d_outs[t - 1], da, w_hh) if t else da @ w_hh
        else:
            cols = torch.add(_select(da4, k, st, rev), offsets, out=idx[t]).view(R, kept)
            if st.unified:
                v = torch.index_select(da, 1, cols[0], out=vals[t])
                w_rows = w_hh.index_select(0, cols[0])
                if timer is not None:
                    timer.start(da.device)
                dh_new = torch.addmm(d_outs[t - 1], v, w_rows) if t else v @ w_rows
            else:
                v = torch.gather(da, 1, cols, out=vals[t])
                if timer is not None:
                    timer.start(da.device)
                dh_new = _rows_times(v, cols, w_hh)
                if t:
                    dh_new += d_outs[t - 1]
        if timer is not None:
            timer.stop(da.device)
        if keep is not None:
            dh_new.addcmul_(dh, keep[t])
        dh = dh_new

    M = T * B
    db = da_all.sum((0, 1)).view(4 * H)
    if timer is not None:
        timer.start(x.device)
    x2, h2 = x.reshape(M, n_in), h_prev.reshape(M, H)
    if dense:
        da2 = da_all.view(M, 4 * H)
        dx = (da2 @ w_ih).view(T, B, n_in) if need_x else None
        dw_ih = da2.t() @ x2
        dw_hh = da2.t() @ h2
        if st.sparse_grad:  # every row kept
            rows = torch.arange(4 * H, device=da2.device)
            dw_ih = reference.rows_to_sparse(rows, dw_ih, 4 * H)
            dw_hh = reference.rows_to_sparse(rows, dw_hh, 4 * H)
    else:
        v2 = vals.view(M, kept)
        i2 = idx.view(T, R, kept).expand(T, B, kept).reshape(M, kept)
        dx = _rows_times(v2, i2, w_ih).view(T, B, n_in) if need_x else None
        if st.sparse_grad:
            dw_ih, dw_hh = _sparse_rows(v2, i2, (x2, h2), 4 * H)
        else:
            dw_ih = _scatter_rows(v2, i2, x2, 4 * H)
            dw_hh = _scatter_rows(v2, i2, h2, 4 * H)
    if timer is not None:
        timer.stop(x.device)
    return dx, dh, dc, dw_ih, dw_hh, db


def _rows_times(vals: Tensor, idx: Tensor, weight: Tensor) -> Tensor:
    """``out[m] = sum_j vals[m, j] * weight[idx[m, j], :]`` (per-row kept entries)."""
    if reference._masked_gemm_pays(vals.shape[0], vals.shape[1], weight.shape[0]):
        return _masked(vals, idx, weight.shape[0]) @ weight
    return reference._bag_sums(idx, weight, None, vals)


def _scatter_rows(vals: Tensor, idx: Tensor, x: Tensor, n_rows: int) -> Tensor:
    """``out[r] = sum over (m, j) with idx[m, j] == r of vals[m, j] * x[m, :]``: the
    weight gradient of the kept entries, ``(n_rows, in)``, zero rows elsewhere (one bag
    per row of the weight, as per-example meProp's grad_W)."""
    if reference._masked_gemm_pays(vals.shape[0], vals.shape[1], n_rows):
        return _masked(vals, idx, n_rows).t() @ x
    units, rows, order = reference._pairs_by_unit(idx, n_rows)
    offsets = torch.searchsorted(units, torch.arange(n_rows, device=units.device))
    return reference._bag_sums(rows, x, offsets, vals.reshape(-1)[order])


def _sparse_rows(vals: Tensor, idx: Tensor, xs, n_rows: int) -> tuple:
    """:func:`_scatter_rows` of each of ``xs`` as a row-sparse COO tensor holding only the
    rows some step kept (``sparse_grad=True``): no ``(n_rows, in)`` tensor is made."""
    units, sums = reference.kept_row_sums(idx, vals, xs, n_rows)
    return tuple(reference.rows_to_sparse(units, s, n_rows) for s in sums)


def _masked(vals: Tensor, idx: Tensor, n_cols: int) -> Tensor:
    return torch.zeros((vals.shape[0], n_cols), dtype=vals.dtype, device=vals.device).scatter_(1, idx, vals)


_DYNAMO_KNOWS_EXPORT = torch.__version__ >= "2.15"


def lstm_layer(x, h0, c0, params, *, k: int, bidirectional: bool = False, unified: bool = True,
               selection: str = "topk", generator=None, batch_sizes=None, sparse_grad: bool = False):
    """One LSTM layer over ``x: (T, B, in)`` from ``(h0, c0): (dirs, B, H)`` with the meProp
    backward above (``k`` resolved: units per gate, ``>= H`` for dense); ``params``: per
    direction ``w_ih, w_hh[, b_ih, b_hh]`` (``nn.LSTM``'s order). Returns
    ``(out (T, B, dirs * H), h_n (dirs, B, H), c_n (dirs, B, H))``. ``batch_sizes``: ``x``
    is a PackedSequence's data (sorted by length, as ``nn.LSTM`` takes it) and ``out`` is
    packed the same way. ``sparse_grad``: the weight gradients come back as row-sparse COO
    tensors holding the rows some step kept, the (exact) bias gradients as sparse tensors
    holding every row, so that one sparse optimizer can own all of the layer's parameters."""
    has_bias = len(params) == (8 if bidirectional else 4)
    if jit_tracing() or (torch.compiler.is_exporting() and (_DYNAMO_KNOWS_EXPORT or not torch.compiler.is_dynamo_compiling())):
        # torch.jit.trace and torch.export capture the forward for inference: torch's own
        # LSTM op (a Python autograd Function could not be saved with the module). Under
        # Dynamo (strict export) only from torch 2.15: 2.11's reads is_exporting() as
        # True inside torch.compile too.
        return _LSTMLayer.forward(x, h0, c0, batch_sizes, k, unified, selection, generator, bidirectional,
                                  has_bias, False, sparse_grad, *params)
    # On a CPU, when a backward may follow, the forward runs step by step and keeps the
    # gates, so the backward recomputes nothing: measured on 2 cores at 25 steps x 190 ->
    # 500, forward + backward at k = 5 took 6.6 ms against 6.9 ms with torch's fused
    # forward and the gates recomputed (batch 1), and 36 against 46 ms (batch 32).
    # Otherwise (no backward to come, CUDA's fused cuDNN forward, ragged packed batches)
    # it is torch's fused LSTM, bit for bit nn.LSTM's.
    keep_gates = x.device.type == "cpu" and torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, h0, c0, *params)
    )
    if not keep_gates and x.device.type == "cpu" and torch.is_grad_enabled() and torch._C._are_functorch_transforms_active():
        # under vmap a batched tensor reports requires_grad=False whatever it wraps
        keep_gates = any(_wrapped_requires_grad(t) for t in (x, h0, c0, *params))
    function = _LSTMLayer if torch._C._are_functorch_transforms_active() else _EagerLSTMLayer
    out, h_n, c_n, *_kept = function.apply(
        x, h0, c0, batch_sizes, k, unified, selection, generator, bidirectional, has_bias, keep_gates, sparse_grad,
        *params,
    )
    return out, h_n, c_n
