"""``MePropLinear``: a drop-in ``nn.Linear`` whose backward keeps the top-k output units."""

from __future__ import annotations

import contextlib
import numbers
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

import torch.nn.functional as F

from ._validation import check_dtype_arg, check_k, check_linear_args, check_options, check_strided, resolve_k
from .functional import (
    _DDP, _any_autocast, _autocast_dtype, _refuse_sparse_under_ddp, apply_meprop, meprop_linear, needs_backward,
    resolve_backend,
    sparse_under_autocast,
)

_STRIDED = torch.strided
_SPARSE_PARAMETRIZED = (
    "sparse_grad=True cannot run on a parametrized layer (torch.nn.utils.parametrize): its "
    "weight or bias is computed, and the parametrization's backward takes a dense gradient; "
    "use sparse_grad=False"
)

__all__ = ["MePropLinear", "MePropLSTM", "SelectionStats"]


class SelectionStats(NamedTuple):
    """What ``selection_stats()`` of a ``MePropLinear`` or ``MePropConv1D`` returns
    (meSimp's counters).

    ``hits[j]``: the rows (examples, tokens) whose kept set held output unit j, since the
    last reset; ``rows``: the rows seen; ``hit_rate = hits / rows`` (zeros when no row
    was seen)."""

    hits: Tensor
    rows: int
    hit_rate: Tensor


def _lost_in_swap(module: nn.Module, own: tuple) -> str | None:
    """What swapping ``module`` for a meProp layer would lose (None: nothing): a forward
    set on the instance (as accelerate's hooks set one), or parameters, buffers or
    submodules besides its own (``own``: its parameters' names)."""
    if "forward" in module.__dict__:
        return "its forward is replaced on the instance (as accelerate's hooks do), which a meProp layer would lose"
    carried = ()
    if parametrize.is_parametrized(module):
        carried = ("parametrizations",)  # moved to the new layer (MePropLinear.from_linear)
    elif not isinstance(module._parameters.get(own[0]), nn.Parameter):
        return None  # computed (pruned): from_* refuses it, saying how to fix it
    extra = [n for n, p in module._parameters.items() if p is not None and n not in own]
    extra += [n for n, b in module._buffers.items() if b is not None and n != "selection_counts"]
    extra += [n for n, m in module._modules.items() if m is not None and n not in carried]
    if extra:
        return f"it holds {', '.join(extra)} besides its own parameters, which a meProp layer would lose"
    return None


def _share_hooks(old: nn.Module, new: nn.Module) -> None:
    """Share ``old``'s hook registries with ``new`` (the objects, not copies), so a handle
    from the old layer still removes its hook and hooks registered before a swap keep
    running; and torch's flag that says which kind of backward hooks it holds (without
    it, ``_call_impl`` runs none of them)."""
    for name in _HOOK_DICTS:
        if name in old.__dict__:
            new.__dict__[name] = old.__dict__[name]
    if "_is_full_backward_hook" in old.__dict__:
        new.__dict__["_is_full_backward_hook"] = old.__dict__["_is_full_backward_hook"]
    for name, value in old.__dict__.items():  # plain attributes a user set (tags, flags)
        if not name.startswith("_") and name not in new.__dict__:
            new.__dict__[name] = value


def _finish_swap(old: nn.Module, new: nn.Module, device) -> nn.Module:
    """The last steps of making ``new`` (built on the meta device) from ``old``: the
    selection counters zeroed on ``device`` (the weight's), ``old``'s training mode and
    hooks."""
    counts = new._buffers.get("selection_counts")
    if counts is not None:
        new._buffers["selection_counts"] = torch.zeros_like(counts, device=device)
    new.train(old.training)
    _share_hooks(old, new)
    return new


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _checked_setting(name: str, doc: str) -> property:
    """A setting stored as ``_<name>``, checked by ``check_options`` when it is set (a
    refused value leaves the old one in place)."""
    private = "_" + name

    def get(self):
        return self.__dict__[private]

    def set(self, value) -> None:
        check_options(**{name: value})
        self.__dict__[private] = value

    return property(get, set, doc=doc)


class _MePropSettings:
    """The checked settings ``MePropLinear`` and ``MePropConv1D`` share, a mixin listed
    before their ``nn.Module`` base: ``k`` (kept as ``_k``; setting it also resets
    ``_k_for``, the ``(units, k resolved)`` pair the forward caches), ``unified``,
    ``selection``, ``backend``, ``track_selection`` with its counters
    (``selection_stats()``, ``reset_selection_stats()``) and ``k_units``.

    A subclass gives ``_n_units()``, its number of output units, and keeps its own
    ``sparse_grad``. The properties are data descriptors on the class, so a read finds
    them before ``nn.Module.__getattr__`` is tried and ``nn.Module.__setattr__`` hands an
    assignment (not a Parameter, Module or buffer) on to their setters."""

    _units_name = "out_features"  # what a fractional k is a fraction of, for messages

    def _n_units(self) -> int:  # pragma: no cover - every subclass gives its own
        raise NotImplementedError

    @property
    def k(self):
        """An int >= 1 (units kept) or a float in (0, 1] (a fraction of the output units)."""
        return self._k

    @k.setter
    def k(self, value) -> None:
        check_k(value, self._units_name)
        self.__dict__["_k"] = value
        self._resolve_k_now()

    def _resolve_k_now(self) -> None:
        """Fill ``_k_for``, the ``(output units, units kept)`` pair the forward reads, for
        the layer's units, here rather than in its first forward: under
        ``torch.compile(dynamic=True)`` a float k read in the forward is a symbolic float,
        which the resolution cannot take. (The forward still resolves k again when its
        weight's units differ, e.g. after meSimp shrank the layer.)"""
        try:
            units = self._n_units()
        except AttributeError:  # not built yet (unpickling): resolved at forward
            units = None
        pair = (-1, -1) if units is None else (units, resolve_k(self._k, units))
        self.__dict__["_k_for"] = pair

    unified = _checked_setting("unified", "True: one set of units per call; False: one per row")
    selection = _checked_setting("selection", '"topk" or "random"')
    backend = _checked_setting("backend", '"auto", "torch" or "triton"')

    @property
    def track_selection(self) -> bool:
        """True: each backward adds its selection statistics to ``selection_counts``."""
        return "selection_counts" in self._buffers

    @track_selection.setter
    def track_selection(self, value) -> None:
        check_options(track_selection=value)
        if value and "selection_counts" not in self._buffers:
            weight = self.weight
            device = weight.device if isinstance(weight, Tensor) else None
            counts = torch.zeros(self._n_units() + 1, dtype=torch.int64, device=device)
            self.register_buffer("selection_counts", counts, persistent=False)
        elif not value and "selection_counts" in self._buffers:
            del self._buffers["selection_counts"]

    def selection_stats(self) -> SelectionStats:
        """Per output unit, the rows whose kept set held it since the last reset (see
        :class:`SelectionStats`); reads the counters (a host sync on a GPU)."""
        counts = self._buffers.get("selection_counts")
        if counts is None:
            raise RuntimeError(
                "this layer keeps no selection statistics; set layer.track_selection = True "
                "(or convert(..., track_selection=True)) before training"
            )
        hits = counts[:-1].clone()
        rows = int(counts[-1])
        rate = hits.double() / rows if rows else torch.zeros_like(hits, dtype=torch.float64)
        return SelectionStats(hits, rows, rate)

    def _apply(self, fn, *args, **kwargs):
        # Counters made on the meta device hold no counts: where to_empty (or any move)
        # gives them real memory, they start at zero, not with what that memory held.
        counts = self._buffers.get("selection_counts")
        from_meta = counts is not None and counts.is_meta
        out = super()._apply(fn, *args, **kwargs)
        counts = self._buffers.get("selection_counts")
        if from_meta and counts is not None and not counts.is_meta:
            with torch.no_grad():
                counts.zero_()
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # load_state_dict(..., assign=True) into a layer built on the meta device gives it
        # real parameters without an _apply; the counters (not in a state_dict) follow
        # them, at zero.
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        counts = self._buffers.get("selection_counts")
        weight = self._parameters.get("weight")
        if counts is not None and counts.is_meta and weight is not None and not weight.is_meta:
            self._buffers["selection_counts"] = torch.zeros(counts.shape, dtype=counts.dtype, device=weight.device)

    def reset_selection_stats(self) -> None:
        """Zero the selection counters (``track_selection`` must be on)."""
        counts = self._buffers.get("selection_counts")
        if counts is None:
            raise RuntimeError("this layer keeps no selection statistics (track_selection is False)")
        counts.zero_()

    @property
    def k_units(self) -> int:
        """The number of output units kept in backward (``k`` resolved for this layer)."""
        return resolve_k(self._k, self._n_units())


class MePropLinear(_MePropSettings, nn.Linear):
    """``nn.Linear`` with a meProp backward.

    Same parameters (``weight``, ``bias``), init, ``state_dict`` and forward as
    ``nn.Linear``; in backward only the ``k`` output units with the largest
    ``sum |grad|`` pass their gradient to the input and the weight (the bias gradient
    stays dense). ``k`` is an int >= 1 or a float in (0, 1] (a fraction of
    ``out_features``, rounded up); ``k >= out_features`` gives the dense gradient.

    The settings (``k``, ``unified``, ``selection``, ``sparse_grad``, ``backend``,
    ``track_selection``) are checked when they are set, at construction or by assignment
    (``layer.k = 0.1``), so a bad value is refused there and the layer keeps its old one.

    ``track_selection=True`` keeps selection statistics for meSimp: every backward adds,
    on the layer's device and without a host sync, how many rows kept each output unit
    (a non-persistent int64 buffer ``selection_counts`` of ``out_features + 1`` entries,
    the last one counting the rows); ``selection_stats()`` reads them,
    ``reset_selection_stats()`` zeroes them. A forward call checks
    only what can change from call to call: the input (and the parameters, which may be
    replaced); everything else comes from the settings as checked.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        k,
        unified: bool = True,
        selection: str = "topk",
        sparse_grad: bool = False,
        backend: str = "auto",
        track_selection: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        resolve_k(k, out_features)  # refuse a bad k before allocating anything
        check_dtype_arg(dtype)
        check_options(
            unified=unified, selection=selection, sparse_grad=sparse_grad, backend=backend,
            track_selection=track_selection,
        )
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.k = k
        self.unified = unified
        self.selection = selection
        self.sparse_grad = sparse_grad
        self.backend = backend
        self.track_selection = track_selection

    # Settings: validated on assignment, stored under a private name (k, unified,
    # selection, backend, track_selection and the counters: _MePropSettings).
    sparse_grad = _checked_setting("sparse_grad", "True: row-sparse weight and bias gradients")

    def _n_units(self) -> int:
        return self.out_features

    def __setstate__(self, state) -> None:
        # A layer pickled before the settings became checked properties kept them in its
        # __dict__ under their public names.
        for name in ("k", "unified", "selection", "sparse_grad", "backend"):
            if name in state:
                state["_" + name] = state.pop(name)
        super().__setstate__(state)
        self._resolve_k_now()

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, k, **options) -> "MePropLinear":
        """A ``MePropLinear`` that shares ``linear``'s Parameter objects (no copy).

        An optimizer built over ``linear``'s parameters keeps working after the swap.
        ``options`` are ``unified``, ``selection``, ``sparse_grad``, ``backend`` and
        ``track_selection``.

        A parametrized layer (``torch.nn.utils.parametrize``: ``weight_norm``,
        ``spectral_norm``, ``orthogonal``, your own) keeps its parametrizations, the same
        modules with the same original parameters and state: the meProp gradient of the
        computed weight flows back through them to the originals.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear; got {type(linear).__name__}")
        unknown = set(options) - {"unified", "selection", "sparse_grad", "backend", "track_selection"}
        if unknown:
            raise TypeError(f"from_linear got unexpected option(s): {', '.join(sorted(unknown))}")
        lost = _lost_in_swap(linear, ("weight", "bias"))
        if lost is not None:
            raise TypeError(f"from_linear cannot wrap this {type(linear).__name__}: {lost}")
        if parametrize.is_parametrized(linear):
            return cls._from_parametrized(linear, k=k, **options)
        if not isinstance(linear._parameters.get("weight"), nn.Parameter):
            raise TypeError(
                "from_linear needs a layer whose weight is a Parameter; this one's is computed "
                "(e.g. by torch.nn.utils.prune or a parametrization): make it permanent first "
                "(prune.remove(layer, 'weight'))"
            )
        if isinstance(linear.weight, nn.parameter.UninitializedParameter):
            raise TypeError(
                f"from_linear needs a layer with initialised parameters; this {type(linear).__name__}'s "
                f"are not materialised yet: run one forward through it first"
            )
        weight = linear.weight
        # Built on the meta device: no throwaway allocation or init of the real size.
        new = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            k=k,
            device="meta",
            dtype=weight.dtype,
            **options,
        )
        new.weight = weight
        if linear.bias is not None:
            new.bias = linear.bias
        return _finish_swap(linear, new, weight.device)

    @classmethod
    def _from_parametrized(cls, linear: nn.Linear, *, k, **options) -> "MePropLinear":
        names = set(linear.parametrizations.keys())
        if names - {"weight", "bias"}:
            raise TypeError(
                f"from_linear cannot wrap this {type(linear).__name__}: it parametrizes "
                f"{', '.join(sorted(names - {'weight', 'bias'}))}, which a meProp layer does not have"
            )
        if options.get("sparse_grad"):
            raise ValueError(_SPARSE_PARAMETRIZED)
        originals = list(linear.parametrizations.parameters())
        dtype = originals[0].dtype if originals else None
        has_bias = "bias" in names or linear._parameters.get("bias") is not None
        new = cls(linear.in_features, linear.out_features, bias=has_bias, k=k, device="meta", dtype=dtype, **options)
        for name in ("weight", "bias"):
            if name in names:
                del new._parameters[name]  # becomes the parametrization's property below
            elif name == "weight" or has_bias:
                setattr(new, name, linear._parameters[name])
        new.parametrizations = linear.parametrizations  # the same modules, originals and state
        parametrize._inject_new_class(new)
        for name in sorted(names):
            parametrize._inject_property(new, name)
        return _finish_swap(linear, new, next(linear.parameters()).device)

    def forward(self, input: Tensor) -> Tensor:
        if self._sparse_grad and "parametrizations" in self._modules:
            raise ValueError(_SPARSE_PARAMETRIZED)
        if self._sparse_grad and torch.is_grad_enabled() and "_is_fsdp_managed_module" in self.__dict__:
            raise RuntimeError(
                "sparse_grad=True does not work under FSDP2 (fully_shard): FSDP2 reduce-scatters "
                "gradients as dense shards and fails on this layer's sparse gradient ('Could not "
                "run fsdp::chunk_cat with arguments from the SparseCPU backend'); use "
                "sparse_grad=False"
            )
        weight, bias = self.weight, self.bias
        # The common case in as few Python operations as possible (inside a training
        # step this code runs cold, at several times its tight-loop cost): CPU or CUDA
        # floating-point parameters, no autocast. Whether input, weight and bias agree in
        # dtype, device and width is left to F.linear, which raises before anything is
        # recorded; the full checks then name the bad value. Anything unusual takes
        # ``meprop_linear``'s full checks (``_checked_forward``).
        if (
            isinstance(input, Tensor)
            and isinstance(weight, Tensor)
            and not _any_autocast()
            and weight.dtype.is_floating_point
            and (weight.is_cpu or weight.is_cuda)
            and weight.dim() == 2
            and (bias is None or (isinstance(bias, Tensor) and bias.dim() == 1))
        ):
            backend = self._backend
            try:
                if not needs_backward(input, weight, bias):
                    if backend == "triton" or input.dtype != weight.dtype:
                        return self._checked_forward(input, weight, bias)  # refused there where it must be
                    return F.linear(input, weight, bias)
                out_features = weight.shape[0]
                if bias is not None and bias.shape[0] != out_features:
                    return self._checked_forward(input, weight, bias)  # a broadcastable bias F.linear would take
                if input.layout is not _STRIDED:
                    return self._checked_forward(input, weight, bias)  # a sparse or nested input: checked there
                k_for = self._k_for
                if k_for[0] != out_features:
                    k_for = self.__dict__["_k_for"] = (out_features, resolve_k(self._k, out_features))
                if backend != "torch":
                    if backend == "auto" and weight.is_cpu:
                        backend = "torch"
                    elif self._sparse_grad and backend == "triton":
                        return self._checked_forward(input, weight, bias)  # refused there, with the reason
                    else:  # "triton" is refused here, before any work, where it cannot run
                        backend = resolve_backend(backend, weight.device, weight.dtype)
                return apply_meprop(
                    input, weight, bias, k_for[1], backend,
                    self._unified, self._selection, self._sparse_grad, None,
                    self._buffers.get("selection_counts"),
                )
            except RuntimeError:
                # the clear error for a bad input, if it is one (autocast is off here)
                self._blame_weight(input, weight)
                check_linear_args(input, weight, bias)
                raise
        return self._checked_forward(input, weight, bias)

    def _blame_weight(self, input, weight) -> None:
        """Raise if the input fits the layer but its weight, replaced, does not."""
        if (
            isinstance(input, Tensor)
            and isinstance(weight, Tensor)
            and input.dim() > 0
            and weight.dim() == 2
            and input.shape[-1] != weight.shape[1]
            and input.shape[-1] == self.in_features
        ):
            raise ValueError(
                f"this layer's weight has shape {tuple(weight.shape)}, which does not match "
                f"in_features={self.in_features}: the weight must be (out_features, "
                f"in_features) = ({self.out_features}, {self.in_features}); the input, of "
                f"shape {tuple(input.shape)}, fits the layer"
            )

    def _checked_forward(self, input: Tensor, weight, bias) -> Tensor:
        # (weight and bias as forward read them: a parametrized weight is computed, and
        # spectral_norm's advances its state, at each read)
        self._blame_weight(input, weight)
        return meprop_linear(
            input,
            weight,
            bias,
            k=self.k,
            unified=self.unified,
            selection=self.selection,
            sparse_grad=self.sparse_grad,
            backend=self.backend,
            counts=self._buffers.get("selection_counts"),
        )

    def extra_repr(self) -> str:
        s = f"{super().extra_repr()}, k={self.k!r}"
        if not self.unified:
            s += ", unified=False"
        if self.selection != "topk":
            s += f", selection={self.selection!r}"
        if self.sparse_grad:
            s += ", sparse_grad=True"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        if self.track_selection:
            s += ", track_selection=True"
        return s


def _state_pair(hx) -> tuple[Tensor, Tensor]:
    if not (isinstance(hx, (tuple, list)) and len(hx) == 2 and all(isinstance(t, Tensor) for t in hx)):
        got = f"a tensor of shape {tuple(hx.shape)}" if isinstance(hx, Tensor) else repr(hx)[:80]
        raise TypeError(f"hx must be a tuple (h0, c0) of two tensors, as for nn.LSTM; got {got}")
    return hx[0], hx[1]


def _check_lstm_tensors(x: Tensor, h0: Tensor, c0: Tensor, weights) -> None:
    """The dtype, device and layout checks ``nn.LSTM`` makes, naming the bad value."""
    check_strided(x, None, None, "MePropLSTM")
    if not x.is_floating_point():
        raise TypeError(f"MePropLSTM needs a floating-point input; got dtype {x.dtype}")
    w = weights[0]
    if x.dtype != w.dtype:
        raise TypeError(
            f"input has dtype {x.dtype} but this MePropLSTM's parameters are {w.dtype}: cast the input "
            f"or the layer (.to({x.dtype})), as nn.LSTM needs"
        )
    if h0.dtype != x.dtype or c0.dtype != x.dtype:
        raise TypeError(f"h0 and c0 must have the input's dtype {x.dtype}; got {h0.dtype} and {c0.dtype}")
    devices = {t.device for t in (x, h0, c0, w)}
    if len(devices) > 1:
        raise ValueError(
            f"input, (h0, c0) and the parameters must be on one device; got input on '{x.device}', "
            f"h0 on '{h0.device}', c0 on '{c0.device}', parameters on '{w.device}'"
        )


class MePropLSTM(nn.LSTM):
    """``nn.LSTM`` with a meProp backward (the README's "LSTM").

    Same constructor, parameters (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``, ...
    ``_reverse``), init, ``state_dict`` and forward outputs as ``nn.LSTM``, plus ``k``
    (units kept per gate: an int >= 1, or a fraction of ``hidden_size`` in (0, 1];
    ``k >= hidden_size`` gives ``nn.LSTM``'s gradients), ``unified`` and ``selection``.
    In backward, at each time step and for each of the four gates, only the top-k of
    that gate's pre-activation gradients pass to the input, the previous hidden state
    and the weights (unified over the batch at that step; per sequence with
    ``unified=False``); the bias gradients and the element-wise parts are exact. The
    torch path runs on any device (cuBLAS on CUDA tensors); see
    :mod:`meprop_triton.recurrent`.

    ``num_layers``, ``bidirectional``, ``batch_first``, ``dropout``, ``(h0, c0)``,
    unbatched input and ``PackedSequence`` input (sequences of different lengths; the
    unified selection of a step is over the sequences that have that step) work as in
    ``nn.LSTM``. ``proj_size > 0`` is refused with an error.

    ``sparse_grad=True``: the weight gradients come back as row-sparse COO tensors holding
    only the rows (gate units) some step kept, and the bias gradients, which are exact, as
    sparse tensors holding every row, so that one optimizer that takes sparse gradients
    (SGD, Adagrad, SparseAdam) can own all of the LSTM's parameters and update only the
    kept rows of its weights. It is refused under DistributedDataParallel, as for
    ``MePropLinear``.
    """

    def __init__(self, *args, k, unified: bool = True, selection: str = "topk", sparse_grad: bool = False,
                 **kwargs) -> None:
        proj_size = kwargs.get("proj_size", args[7] if len(args) > 7 else 0)
        if isinstance(proj_size, numbers.Integral) and not isinstance(proj_size, bool) and proj_size > 0:
            # (nn.LSTM itself refuses a negative one)
            raise NotImplementedError(f"MePropLSTM does not support proj_size > 0 yet; got proj_size={proj_size}, use 0")
        check_k(k, "hidden_size")
        check_options(unified=unified, selection=selection, sparse_grad=sparse_grad)
        super().__init__(*args, **kwargs)
        self.k = k
        self.unified = unified
        self.selection = selection
        self.sparse_grad = sparse_grad

    @property
    def k(self):
        """Units kept per gate: an int >= 1 or a fraction of hidden_size in (0, 1]."""
        return self._k

    @k.setter
    def k(self, value) -> None:
        check_k(value, "hidden_size")
        self.__dict__["_k"] = value

    unified = _checked_setting("unified", "True: one set per gate and step for the batch; False: per sequence")
    selection = _checked_setting("selection", '"topk" or "random"')
    sparse_grad = _checked_setting(
        "sparse_grad", "True: row-sparse weight gradients (the kept rows) and sparse bias gradients"
    )

    @property
    def k_units(self) -> int:
        return resolve_k(self._k, self.hidden_size)

    def _refuse_sparse_under_ddp(self) -> None:
        ddp = getattr(_DDP, "_active_ddp_module", None)
        if ddp is not None and torch.is_grad_enabled():
            _refuse_sparse_under_ddp(ddp, self.weight_ih_l0, None)

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM, *, k, unified: bool = True, selection: str = "topk",
                  sparse_grad: bool = False) -> "MePropLSTM":
        """A ``MePropLSTM`` sharing ``lstm``'s Parameter objects (no copy)."""
        if not isinstance(lstm, nn.LSTM):
            raise TypeError(f"from_lstm expects an nn.LSTM; got {type(lstm).__name__}")
        lost = _lost_in_swap(lstm, tuple(lstm._flat_weights_names))
        if lost is not None:
            raise TypeError(f"from_lstm cannot wrap this {type(lstm).__name__}: {lost}")
        new = cls(
            lstm.input_size, lstm.hidden_size, lstm.num_layers, bias=lstm.bias, batch_first=lstm.batch_first,
            dropout=lstm.dropout, bidirectional=lstm.bidirectional, proj_size=lstm.proj_size,
            k=k, unified=unified, selection=selection, sparse_grad=sparse_grad, device="meta",
            dtype=lstm.weight_ih_l0.dtype,
        )
        for name in lstm._flat_weights_names:
            setattr(new, name, getattr(lstm, name))
        new.train(lstm.training)
        _share_hooks(lstm, new)
        return new

    def _weights(self) -> list:
        """The weights as the module holds them now, read by name at each forward:
        ``torch.func.functional_call`` and ``nn.utils.parametrize`` put tensors in place
        of the parameters without passing through ``__setattr__``, so ``nn.LSTM``'s cached
        ``_flat_weights`` would be stale (``nn.LSTM`` refreshes that cache in its own
        forward)."""
        return [getattr(self, name) for name in self._flat_weights_names]

    def forward(self, input, hx=None):
        if self._sparse_grad:
            self._refuse_sparse_under_ddp()
        if isinstance(input, nn.utils.rnn.PackedSequence):
            return self._forward_packed(input, hx)
        if not isinstance(input, Tensor) or input.dim() not in (2, 3):
            got = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
            raise ValueError(f"MePropLSTM expects a 2-D (unbatched) or 3-D input; got {got}")
        if input.shape[-1] != self.input_size:
            raise ValueError(
                f"input's last dimension must equal input_size={self.input_size}; got input of shape "
                f"{tuple(input.shape)}"
            )
        unbatched = input.dim() == 2
        x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if self.batch_first else input)
        if x.shape[0] == 0:  # nn.LSTM refuses it too; the step-by-step path would fail in backward
            raise ValueError(f"MePropLSTM needs a sequence of at least one step; got input of shape {tuple(input.shape)}")
        B = x.shape[1]
        dirs = 2 if self.bidirectional else 1
        L, H = self.num_layers, self.hidden_size
        if hx is None:
            h0 = x.new_zeros(L * dirs, B, H)
            c0 = x.new_zeros(L * dirs, B, H)
        else:
            h0, c0 = _state_pair(hx)
            if unbatched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
            if tuple(h0.shape) != (L * dirs, B, H) or tuple(c0.shape) != (L * dirs, B, H):
                raise ValueError(
                    f"(h0, c0) must each have shape {(L * dirs, B, H)}"
                    f"{' (unbatched: ' + str((L * dirs, H)) + ')' if unbatched else ''}; got "
                    f"{tuple(hx[0].shape)} and {tuple(hx[1].shape)}"
                )
        output, h_n, c_n = self._layers(x, h0, c0)
        if unbatched:
            return output.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, (h_n, c_n)

    def _layers(self, x, h0, c0, batch_sizes=None):
        """Every layer over ``x`` (``(T, B, in)``, or a PackedSequence's data with its
        ``batch_sizes``): ``(output, h_n, c_n)``. Under autocast the tensors are cast as
        autocast casts ``nn.LSTM``'s (to its dtype; float64 left alone), and the layers
        run in that dtype."""
        from .recurrent import lstm_layer

        weights = self._weights()
        dtype = _autocast_dtype(x)
        if dtype is not None and self._sparse_grad and torch.is_grad_enabled():
            raise sparse_under_autocast(dtype)
        if dtype is not None:
            def cast(t):
                return t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t

            x, h0, c0, weights = cast(x), cast(h0), cast(c0), [cast(w) for w in weights]
        _check_lstm_tensors(x, h0, c0, weights)
        dirs = 2 if self.bidirectional else 1
        L, H = self.num_layers, self.hidden_size
        k = resolve_k(self._k, H)
        per = len(weights) // (L * dirs)
        h_n, c_n = [], []
        layer_in = x
        with torch.autocast(x.device.type, enabled=False) if dtype is not None else contextlib.nullcontext():
            for layer in range(L):
                s = slice(layer * dirs, (layer + 1) * dirs)
                out, h, c = lstm_layer(
                    layer_in, h0[s], c0[s], weights[layer * dirs * per:(layer + 1) * dirs * per],
                    k=k, bidirectional=dirs == 2, unified=self._unified, selection=self._selection,
                    batch_sizes=batch_sizes, sparse_grad=self._sparse_grad,
                )
                h_n.append(h)
                c_n.append(c)
                layer_in = out
                if self.dropout and self.training and layer < L - 1:
                    layer_in = F.dropout(layer_in, self.dropout, training=True)
        return layer_in, torch.cat(h_n), torch.cat(c_n)

    def _forward_packed(self, packed, hx):
        """A PackedSequence (sequences of different lengths): the same layers on its
        data, each sequence's steps only, states permuted as ``nn.LSTM`` does."""
        data, batch_sizes, sorted_idx, unsorted_idx = packed
        if data.dim() != 2 or data.shape[1] != self.input_size:
            raise ValueError(
                f"the PackedSequence's data must be (steps, input_size={self.input_size}); got {tuple(data.shape)}"
            )
        B = int(batch_sizes[0])
        dirs = 2 if self.bidirectional else 1
        L, H = self.num_layers, self.hidden_size
        if hx is None:
            h0 = data.new_zeros(L * dirs, B, H)
            c0 = data.new_zeros(L * dirs, B, H)
        else:
            h0, c0 = _state_pair(hx)
            if tuple(h0.shape) != (L * dirs, B, H) or tuple(c0.shape) != (L * dirs, B, H):
                raise ValueError(
                    f"(h0, c0) must each have shape {(L * dirs, B, H)}; got {tuple(h0.shape)} and {tuple(c0.shape)}"
                )
            if sorted_idx is not None:
                _check_lstm_tensors(data, h0, c0, self._weights())  # before index_select moves them
                h0, c0 = h0.index_select(1, sorted_idx), c0.index_select(1, sorted_idx)
        layer_in, h_n, c_n = self._layers(data, h0, c0, batch_sizes)
        if unsorted_idx is not None:
            h_n, c_n = h_n.index_select(1, unsorted_idx), c_n.index_select(1, unsorted_idx)
        output = nn.utils.rnn.PackedSequence(layer_in, batch_sizes, sorted_idx, unsorted_idx)
        return output, (h_n, c_n)

    def extra_repr(self) -> str:
        s = f"{super().extra_repr()}, k={self.k!r}"
        if not self.unified:
            s += ", unified=False"
        if self.selection != "topk":
            s += f", selection={self.selection!r}"
        if self.sparse_grad:
            s += ", sparse_grad=True"
        return s
