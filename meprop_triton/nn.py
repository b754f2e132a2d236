"""``MePropLinear``: a drop-in ``nn.Linear`` whose backward keeps the top-k output units."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._validation import check_options, resolve_k
from .functional import meprop_linear

__all__ = ["MePropLinear"]

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


class MePropLinear(nn.Linear):
    """``nn.Linear`` with a meProp backward.

    Same parameters (``weight``, ``bias``), init, ``state_dict`` and forward as
    ``nn.Linear``; in backward only the ``k`` output units with the largest
    ``sum |grad|`` pass their gradient to the input and the weight (the bias gradient
    stays dense). ``k`` is an int >= 1 or a float in (0, 1] (a fraction of
    ``out_features``, rounded up); ``k >= out_features`` gives the dense gradient.
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
        device=None,
        dtype=None,
    ) -> None:
        resolve_k(k, out_features)  # refuse a bad k before allocating anything
        check_options(unified=unified, selection=selection, sparse_grad=sparse_grad, backend=backend)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.k = k
        self.unified = unified
        self.selection = selection
        self.sparse_grad = sparse_grad
        self.backend = backend

    @property
    def k_units(self) -> int:
        """The number of output units kept in backward (``k`` resolved for this layer)."""
        return resolve_k(self.k, self.out_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, k, **options) -> "MePropLinear":
        """A ``MePropLinear`` that shares ``linear``'s Parameter objects (no copy).

        An optimizer built over ``linear``'s parameters keeps working after the swap.
        ``options`` are ``unified``, ``selection``, ``sparse_grad`` and ``backend``.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear; got {type(linear).__name__}")
        unknown = set(options) - {"unified", "selection", "sparse_grad", "backend"}
        if unknown:
            raise TypeError(f"from_linear got unexpected option(s): {', '.join(sorted(unknown))}")
        if not isinstance(linear._parameters.get("weight"), nn.Parameter):
            raise TypeError(
                "from_linear needs a layer whose weight is a Parameter; this one's is computed "
                "(e.g. by torch.nn.utils.prune or a parametrization): make it permanent first "
                "(prune.remove(layer, 'weight'))"
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
        new.train(linear.training)
        # Share the hook registries (not copies), so a handle from the old layer still
        # removes its hook, and hooks registered before the swap keep running.
        for name in _HOOK_DICTS:
            if name in linear.__dict__:
                new.__dict__[name] = linear.__dict__[name]
        return new

    def forward(self, input: Tensor) -> Tensor:
        return meprop_linear(
            input,
            self.weight,
            self.bias,
            k=self.k,
            unified=self.unified,
            selection=self.selection,
            sparse_grad=self.sparse_grad,
            backend=self.backend,
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
        return s
