"""Argument checks shared by the public entry points.

Every check runs before any work is done, so a refused call leaves the caller's tensors,
parameters and gradients exactly as they were.
"""

from __future__ import annotations

import math
import numbers

import torch

SELECTIONS = ("topk", "random")
BACKENDS = ("auto", "torch", "triton")


def check_k(k, of: str = "out_features") -> None:
    """Check that ``k`` is an int >= 1 or a float in (0, 1] (a fraction of ``of``, the
    layer's units: out_features, nf, hidden_size); raise otherwise."""
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise TypeError(
            f"k must be an int >= 1 (a number of output units) or a float in (0, 1] "
            f"(a fraction of {of}); got {k!r} of type {type(k).__name__}"
        )
    if isinstance(k, numbers.Integral):
        if k < 1:
            raise ValueError(
                f"k must be an int >= 1 (a number of output units); got {k!r}"
            )
        return
    k = float(k)
    if not math.isfinite(k) or not 0.0 < k <= 1.0:
        raise ValueError(
            f"a float k is a fraction of {of} and must lie in (0, 1]; got {k!r} "
            f"(pass an int for a number of units)"
        )


def resolve_k(k, out_features: int) -> int:
    """The number of units kept for a layer with ``out_features`` outputs.

    An int is used as is (values >= out_features mean the dense gradient); a float in
    (0, 1] is a fraction of ``out_features``, rounded up, at least 1. The result is
    capped at ``out_features``.

    Rounding noise does not add a unit: an excess over a whole number of at most a
    millionth of the product is dropped. That covers float64's (``0.07 * 100`` is
    7.000000000000001) and float32's (``np.float32(0.1)`` is 0.10000000149..., a 1.5e-8
    excess), so ``k=0.1`` keeps 10 of 100 units however it was stored.
    """
    check_k(k)
    if isinstance(k, numbers.Integral):
        n = int(k)
    else:
        units = float(k) * out_features
        n = math.floor(units)
        if units - n > 1e-6 * units:
            n += 1
    return max(1, min(n, int(out_features)))


def check_options(
    *, unified=True, selection="topk", sparse_grad=False, backend="auto", track_selection=False
) -> None:
    """Check the meProp options given (the defaults always pass)."""
    if not isinstance(unified, bool):
        raise TypeError(f"unified must be True or False; got {unified!r}")
    if not isinstance(track_selection, bool):
        raise TypeError(f"track_selection must be True or False; got {track_selection!r}")
    if not isinstance(sparse_grad, bool):
        raise TypeError(f"sparse_grad must be True or False; got {sparse_grad!r}")
    if selection not in SELECTIONS:
        raise ValueError(
            f"selection must be one of {', '.join(map(repr, SELECTIONS))}; got {selection!r}"
        )
    if backend not in BACKENDS:
        raise ValueError(
            f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}"
        )


def check_linear_args(input, weight, bias) -> None:
    """The checks ``F.linear`` would make, with messages that name the bad value."""
    for name, t in (("input", input), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None; got {type(bias).__name__}")
    for name, t in (("input", input), ("weight", weight), ("bias", bias)):
        if t is not None and not t.is_floating_point():
            raise TypeError(
                f"meProp needs floating-point tensors; {name} has dtype {t.dtype}"
            )
    if weight.dim() != 2:
        raise ValueError(
            f"weight must be 2-D (out_features, in_features); got shape {tuple(weight.shape)}"
        )
    out_features, in_features = weight.shape
    if input.dim() == 0:
        raise ValueError("input must have at least one dimension (..., in_features); got a 0-d tensor")
    if input.shape[-1] != in_features:
        raise ValueError(
            f"input's last dimension must equal in_features={in_features}, the width of "
            f"weight {tuple(weight.shape)}; got input of shape {tuple(input.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(
            f"bias must have shape ({out_features},) to match weight {tuple(weight.shape)}; "
            f"got {tuple(bias.shape)}"
        )
    if input.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        got = f"input {input.dtype}, weight {weight.dtype}"
        if bias is not None:
            got += f", bias {bias.dtype}"
        raise TypeError(f"input, weight and bias must share one dtype; got {got}")
    devices = {t.device for t in (input, weight, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(
            f"input, weight and bias must be on one device; got {sorted(map(str, devices))}"
        )


_SPARSE = (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)


def check_strided(input, weight, bias, what: str = "meProp's backward", sparse_input: bool = False) -> None:
    """Refuse tensors other than dense (strided) ones where ``what`` needs dense ones;
    ``sparse_input``: a sparse input that needs no gradient is taken (MePropLinear's
    backward reads it densified, for the weight gradient)."""
    for name, t in (("input", input), ("weight", weight), ("bias", bias)):
        if t is None or t.layout == torch.strided:
            continue
        if t.layout in _SPARSE:
            if sparse_input and name == "input":
                if not t.requires_grad:
                    continue
                raise TypeError(
                    f"{what} takes a sparse input only when the input needs no gradient; this one has "
                    f"layout {t.layout} and requires grad: pass input.to_dense()"
                )
            raise TypeError(f"{what} needs dense (strided) tensors; {name} has layout {t.layout}: pass {name}.to_dense()")
        raise TypeError(  # a nested tensor (torch.jagged), or a layout this code does not know
            f"{what} needs dense (strided) tensors; {name} has layout {t.layout}"
            + (": apply the layer to its packed rows (input.values()) and nest the result again"
               if name == "input" and str(t.layout) == "torch.jagged" else "")
        )


def check_dtype_arg(dtype) -> None:
    """A layer's ``dtype=`` argument: None or a floating-point dtype (meProp's forward
    refuses every other, so a layer built with one could never run)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype (or None for the default); got {dtype!r}")
