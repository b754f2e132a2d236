"""meProp for an LSTM layer: one autograd Function over a whole sequence (torch path).

Notation (DESIGN section 1, "LSTM"): one layer and direction, input ``x_t: (B, in)``,
state ``h_t, c_t: (B, H)``, gate pre-activations
``a_t = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh`` of ``4H`` values in torch's gate order
(input, forget, cell, output; ``H`` each).

Forward: torch's own fused LSTM (``torch.lstm``), so the outputs are ``nn.LSTM``'s exactly.
Backward: the gates are recomputed from the known h sequence (one GEMM over all steps
for each weight, the cell states by an element-wise loop), then a loop from the last
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
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference

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


def _gate_topk(scores: Tensor, k: int) -> Tensor:
    """``(R, 4, H)`` non-negative scores -> ``(R, 4k)`` flat indices into ``4H``: per row
    and gate the k largest (ties to the lower index, NaN/inf as +inf)."""
    R, four, H = scores.shape
    idx = reference.per_example_topk_indices(scores.reshape(R * four, H), k, sort=False)
    offsets = torch.arange(four, device=scores.device).mul_(H).repeat(R).unsqueeze(1)
    return (idx + offsets).reshape(R, four * k)


def _gate_random(R: int, H: int, k: int, generator, device) -> Tensor:
    idx = reference.per_example_random_indices(R * 4, H, k, generator=generator, device=device, sort=False)
    offsets = torch.arange(4, device=device).mul_(H).repeat(R).unsqueeze(1)
    return (idx + offsets).reshape(R, 4 * k)


class _LSTMLayer(torch.autograd.Function):
    """One layer, one or both directions: ``params`` are ``(w_ih, w_hh[, b_ih, b_hh])`` per
    direction; ``h0``, ``c0``: ``(dirs, B, H)``. The forward is one ``torch.lstm`` call
    for the layer (both directions at once, as ``nn.LSTM`` runs it)."""

    @staticmethod
    def forward(ctx, x, h0, c0, batch_sizes, k, unified, selection, generator, bidirectional, has_bias, *params):
        if batch_sizes is None:
            out, h_n, c_n = torch.lstm(x, (h0, c0), list(params), has_bias, 1, 0.0, False, bidirectional, False)
        else:  # packed: x is the PackedSequence's data
            out, h_n, c_n = torch.lstm(x, batch_sizes, (h0, c0), list(params), has_bias, 1, 0.0, False, bidirectional)
        ctx.save_for_backward(x, h0, c0, out, *params)
        ctx.k, ctx.unified, ctx.selection, ctx.generator = k, unified, selection, generator
        ctx.dirs, ctx.has_bias, ctx.batch_sizes = 2 if bidirectional else 1, has_bias, batch_sizes
        return out, h_n, c_n

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn):
        x, h0, c0, out, *params = ctx.saved_tensors
        per = 4 if ctx.has_bias else 2
        H = h0.shape[2]
        need_x = ctx.needs_input_grad[0]
        active = None
        packed_x = None
        if ctx.batch_sizes is not None:  # work on the padded (T, B) layout, inactive steps masked
            bs = ctx.batch_sizes.to(x.device)
            active = torch.arange(h0.shape[1], device=x.device).unsqueeze(0) < bs.unsqueeze(1)  # (T, B)
            packed_x = x
            x, out = _padded(x, active), _padded(out, active)
            d_out = None if d_out is None else _padded(d_out, active)
        dx = torch.zeros_like(x) if need_x else None
        dh0, dc0, dparams = [], [], []
        for d in range(ctx.dirs):
            w_ih, w_hh, *bias = params[d * per:(d + 1) * per]
            b_ih, b_hh = bias if bias else (None, None)
            flip = (lambda t: t.flip(0)) if d else (lambda t: t)
            half = slice(d * H, (d + 1) * H)
            g = _direction_backward(
                ctx, flip(x), h0[d], c0[d], w_ih, w_hh, b_ih, b_hh, flip(out[..., half]),
                None if d_out is None else flip(d_out[..., half]),
                None if d_hn is None else d_hn[d], None if d_cn is None else d_cn[d], need_x,
                None if active is None else flip(active),
            )
            gx, gh, gc, gw_ih, gw_hh, gb = g
            if need_x:
                dx += flip(gx)
            dh0.append(gh)
            dc0.append(gc)
            dparams += [gw_ih, gw_hh] + ([gb, gb.clone()] if bias else [])
        if active is not None and need_x:
            dx = dx[active]  # back to the packed layout
        return (
            dx, torch.stack(dh0), torch.stack(dc0), None, None, None, None, None, None, None,
            *(p if ctx.needs_input_grad[10 + i] else None for i, p in enumerate(dparams)),
        )


def _padded(data: Tensor, active: Tensor) -> Tensor:
    """A PackedSequence's ``data`` in the padded ``(T, B, ...)`` layout (zeros where a
    sequence has ended): packed rows are time-major, so a boolean row-major assignment
    puts each where it belongs."""
    out = data.new_zeros((*active.shape, *data.shape[1:]))
    out[active] = data
    return out


def _direction_backward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, out, d_out, d_hn, d_cn, need_x, active=None):
    """The meProp backward of one direction over ``x: (T, B, in)`` (time in the order the
    direction runs): ``(dx, dh0, dc0, dW_ih, dW_hh, db)``. ``active``: ``(T, B)`` bool,
    False where a (packed) sequence has no step: there the state passes unchanged."""
    T, B, n_in = x.shape
    H = w_hh.shape[1]
    k = ctx.k
    if d_out is None:
        d_out = torch.zeros_like(out)
    h_prev = torch.cat([h0.unsqueeze(0), out[:-1]], 0)  # (T, B, H)
    if active is not None:  # a step after an inactive one starts from h0 (reversed packed)
        before = torch.cat([active.new_zeros(1, B), active[:-1]], 0).unsqueeze(2)
        h_prev = torch.where(before, h_prev, h0.unsqueeze(0))
    # the gates, recomputed: one GEMM per weight over all steps
    a = F.linear(x, w_ih, b_ih) + F.linear(h_prev, w_hh, b_hh)  # (T, B, 4H)
    i, f, g, o = a.chunk(4, dim=2)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    c = torch.empty_like(i)
    c_t = c0
    for t in range(T):
        c_new = f[t] * c_t + i[t] * g[t]
        c_t = c_new if active is None else torch.where(active[t].unsqueeze(1), c_new, c_t)
        c[t] = c_t
    c_prev = torch.cat([c0.unsqueeze(0), c[:-1]], 0)
    tanh_c = c.tanh()

    dense = k >= H
    kept = 4 * (H if dense else k)
    vals = torch.empty((T, B, kept), dtype=a.dtype, device=a.device)  # the kept da
    idx = None if dense else torch.empty((T, B, kept), dtype=torch.int64, device=a.device)
    db = torch.zeros(4 * H, dtype=a.dtype, device=a.device)
    dh = d_hn if d_hn is not None else torch.zeros_like(h0)
    dc = d_cn if d_cn is not None else torch.zeros_like(c0)
    score_dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    for t in range(T - 1, -1, -1):
        act = None if active is None else active[t].unsqueeze(1)
        dh_in, dc_in = dh, dc
        dh = dh + d_out[t]
        do = dh * tanh_c[t]
        dc = dc + dh * o[t] * (1 - tanh_c[t] * tanh_c[t])
        da = torch.cat([
            dc * g[t] * i[t] * (1 - i[t]),
            dc * c_prev[t] * f[t] * (1 - f[t]),
            dc * i[t] * (1 - g[t] * g[t]),
            do * o[t] * (1 - o[t]),
        ], 1)  # (B, 4H)
        if act is not None:
            da = da * act
        db += da.sum(0)
        dc = dc * f[t]
        if act is not None:
            dc = torch.where(act, dc, dc_in)
        timer = ProductTimer.active
        if dense:
            vals[t] = da
            if timer is not None:
                timer.start(da.device)
            dh = da @ w_hh
            if timer is not None:
                timer.stop(da.device)
            if act is not None:
                dh = torch.where(act, dh, dh_in)
            continue
        if ctx.selection == "random":
            sel = _gate_random(1 if ctx.unified else B, H, k, ctx.generator, da.device)
        elif ctx.unified:
            scores = da.abs().sum(0, dtype=score_dtype).nan_to_num_(nan=float("inf"))
            sel = _gate_topk(scores.reshape(1, 4, H), k)
        else:
            sel = _gate_topk(da.abs().reshape(B, 4, H), k)
        if ctx.unified:
            cols = sel[0]
            v = da.index_select(1, cols)  # (B, 4k)
            vals[t] = v
            idx[t] = cols
            if timer is not None:
                timer.start(da.device)
            dh = v @ w_hh.index_select(0, cols)
        else:
            v = da.gather(1, sel)
            vals[t] = v
            idx[t] = sel
            if timer is not None:
                timer.start(da.device)
            dh = _rows_times(v, sel, w_hh)
        if timer is not None:
            timer.stop(da.device)
        if act is not None:
            dh = torch.where(act, dh, dh_in)

    M = T * B
    timer = ProductTimer.active
    if timer is not None:
        timer.start(x.device)
    if dense:
        da_all = vals.reshape(M, 4 * H)
        dx = (da_all @ w_ih).reshape(T, B, n_in) if need_x else None
        dw_ih = da_all.t() @ x.reshape(M, n_in)
        dw_hh = da_all.t() @ h_prev.reshape(M, H)
    else:
        v2, i2 = vals.reshape(M, kept), idx.reshape(M, kept)
        dx = _rows_times(v2, i2, w_ih).reshape(T, B, n_in) if need_x else None
        dw_ih = _scatter_rows(v2, i2, x.reshape(M, n_in), 4 * H)
        dw_hh = _scatter_rows(v2, i2, h_prev.reshape(M, H), 4 * H)
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
    units, rows, order = reference._pairs_by_unit(idx)
    offsets = torch.searchsorted(units, torch.arange(n_rows, device=units.device))
    return reference._bag_sums(rows, x, offsets, vals.reshape(-1)[order])


def _masked(vals: Tensor, idx: Tensor, n_cols: int) -> Tensor:
    return torch.zeros((vals.shape[0], n_cols), dtype=vals.dtype, device=vals.device).scatter_(1, idx, vals)


def lstm_layer(x, h0, c0, params, *, k: int, bidirectional: bool = False, unified: bool = True,
               selection: str = "topk", generator=None, batch_sizes=None):
    """One LSTM layer over ``x: (T, B, in)`` from ``(h0, c0): (dirs, B, H)`` with the meProp
    backward above (``k`` resolved: units per gate, ``>= H`` for dense); ``params``: per
    direction ``w_ih, w_hh[, b_ih, b_hh]`` (``nn.LSTM``'s order). Returns
    ``(out (T, B, dirs * H), h_n (dirs, B, H), c_n (dirs, B, H))``. ``batch_sizes``: ``x``
    is a PackedSequence's data (sorted by length, as ``nn.LSTM`` takes it) and ``out`` is
    packed the same way."""
    has_bias = len(params) == (8 if bidirectional else 4)
    return _LSTMLayer.apply(x, h0, c0, batch_sizes, k, unified, selection, generator, bidirectional, has_bias, *params)
