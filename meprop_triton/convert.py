"""``convert``: swap the ``nn.Linear`` layers of an existing model for ``MePropLinear``."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable

from torch import nn

from ._validation import check_k, check_options
from .nn import MePropLinear, MePropLSTM

__all__ = ["convert"]

_OPTIONS = {"unified": True, "selection": "topk", "sparse_grad": False, "backend": "auto", "track_selection": False}


def _convertible(module: nn.Module) -> bool:
    # Plain nn.Linear only (and MePropLinear, to change its settings): a subclass may
    # have a forward of its own that a swap would lose, e.g. the out_proj of
    # nn.MultiheadAttention, whose weight is used without calling its forward.
    return type(module) in (nn.Linear, MePropLinear)


def _exclusion(exclude, names: list[str]) -> Callable[[str, nn.Module], bool]:
    if exclude is None:
        return lambda name, module: False
    if callable(exclude):
        return exclude
    if isinstance(exclude, str):
        exclude = [exclude]
    if not isinstance(exclude, Iterable):
        raise TypeError(
            "exclude must be a module name or pattern, a list of them, or a predicate "
            f"(name, module) -> bool; got {type(exclude).__name__}"
        )
    patterns = list(exclude)
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"exclude patterns must be strings; got {p!r}")
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            raise ValueError(
                f"exclude pattern {p!r} matches no module of the model; module names are "
                f"as in model.named_modules(), e.g. {names[1:4] or names}"
            )

    def excluded(name: str, module: nn.Module) -> bool:
        # A module is excluded when its name, or the name of a module it sits in, matches.
        parts = name.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return any(fnmatch.fnmatchcase(q, p) for q in prefixes for p in patterns)

    return excluded


def _lstm_convertible(module: nn.Module, lstm: bool) -> bool:
    return lstm and type(module) in (nn.LSTM, MePropLSTM)


def _swapped(module: nn.Module, k, options: dict) -> nn.Module:
    if isinstance(module, nn.LSTM):  # the options an LSTM takes; the rest are a Linear's
        return MePropLSTM.from_lstm(
            module, k=k, **{n: v for n, v in options.items() if n in ("unified", "selection")}
        )
    return MePropLinear.from_linear(module, k=k, **options)


def convert(model: nn.Module, *, k, exclude=None, lstm: bool = False, **options) -> nn.Module:
    """Swap every ``nn.Linear`` in ``model`` for a ``MePropLinear``, in place.

    Args:
        model: any module; returned, converted. A bare ``nn.Linear`` cannot be swapped
            in place, so a new ``MePropLinear`` sharing its parameters is returned.
        k: as for ``MePropLinear`` (an int >= 1, or a fraction of each layer's
            ``out_features`` in (0, 1]).
        exclude: layers to leave dense: qualified names as in ``model.named_modules()``
            (fnmatch patterns allowed; a name also excludes everything inside that
            module), or a predicate ``(name, module) -> bool``. The paper keeps the
            output layer dense: ``exclude=["classifier"]``.
        lstm: also swap every ``nn.LSTM`` for a ``MePropLSTM`` sharing its parameters
            (``k`` then counts units per gate of its hidden size; of the options only
            ``unified`` and ``selection`` apply to it).
        options: ``unified``, ``selection``, ``sparse_grad``, ``backend``,
            ``track_selection``.

    The new layers share the old layers' Parameter objects, so an optimizer built
    before the conversion keeps working. Layers used inside ``nn.MultiheadAttention``
    and other ``nn.Linear`` subclasses are left alone. A layer shared between several
    places stays shared (excluded under any of its names, it stays dense everywhere).
    Nothing is changed when an argument is refused.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module; got {type(model).__name__}")
    unknown = set(options) - set(_OPTIONS)
    if unknown:
        raise TypeError(
            f"convert got unexpected option(s) {', '.join(sorted(unknown))}; "
            f"expected some of {', '.join(_OPTIONS)}"
        )
    check_k(k)
    check_options(**{**_OPTIONS, **options})
    if not isinstance(lstm, bool):
        raise TypeError(f"lstm must be True or False; got {lstm!r}")

    named = list(model.named_modules(remove_duplicate=False))
    names = [n for n, _ in named]
    excluded = _exclusion(exclude, names)

    if _convertible(model) or _lstm_convertible(model, lstm):
        return model if excluded("", model) else _swapped(model, k, options)

    inside_mha = set()
    for name, module in named:
        if isinstance(module, nn.MultiheadAttention):
            inside_mha.update(id(m) for m in module.modules())

    # Decide everything first, then swap: a refused call changes nothing.
    candidates = []
    kept = set()  # ids of layers excluded under at least one of their names
    for parent_name, parent in named:
        if id(parent) in inside_mha:
            continue
        for child_name, child in parent.named_children():
            qualified = f"{parent_name}.{child_name}" if parent_name else child_name
            if (_convertible(child) or _lstm_convertible(child, lstm)) and id(child) not in inside_mha:
                candidates.append((parent, child_name, child))
                if excluded(qualified, child):
                    kept.add(id(child))
    # A shared layer excluded in one place stays dense everywhere, so it stays shared.
    swaps = [(p, n, c) for p, n, c in candidates if id(c) not in kept]
    replacement = {}
    for _, _, child in swaps:
        if id(child) not in replacement:
            replacement[id(child)] = _swapped(child, k, options)
    for parent, child_name, child in swaps:
        setattr(parent, child_name, replacement[id(child)])
    return model
