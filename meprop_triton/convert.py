"""``convert``: swap the linear layers of an existing model for meProp layers.

``nn.Linear`` becomes ``MePropLinear``, transformers' ``Conv1D`` (recognised by duck
typing) ``MePropConv1D``, and with ``lstm=True`` ``nn.LSTM`` ``MePropLSTM``, each sharing
the old layer's Parameter objects. ``convert(..., report=True)`` also returns a
:class:`ConversionReport` saying what was converted and what was left dense, and why.
``meprop_settings`` / ``apply_settings`` record a converted model's layers and settings
and redo the conversion on a freshly loaded (dense) copy.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import inspect
import numbers
import textwrap
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from torch import nn
from torch.nn.utils.parametrize import type_before_parametrizations

from ._validation import check_k, check_options
from .conv1d import MePropConv1D, is_conv1d
from .nn import MePropLinear, MePropLSTM, _lost_in_swap

__all__ = ["convert", "ConversionReport", "meprop_settings", "apply_settings"]

_OPTIONS = {"unified": True, "selection": "topk", "sparse_grad": False, "backend": "auto", "track_selection": False}
_LSTM_OPTIONS = ("unified", "selection", "sparse_grad")
_TIED = ("skip", "convert")


@dataclass
class ConversionReport:
    """What ``convert(..., report=True)`` did.

    ``converted``: qualified module name -> the class it had (``"Linear"``, ``"Conv1D"``,
    ``"LSTM"``, or a meProp class whose settings were changed); ``left_dense``: name ->
    why it was left alone (excluded, tied weight, a type that cannot be swapped);
    ``notes``: name -> a caveat about a converted layer (its parent's forward sometimes
    uses its weight without calling it: there its backward stays dense);
    ``unchanged``: name -> why a layer that was already a meProp layer kept its settings
    (excluded, say, when ``convert`` runs a second time to give some layers another k).
    Names are as in ``model.named_modules()``; ``""`` is the model itself. A layer
    reachable under several names is listed under the first. ``str(report)`` is a
    readable summary.
    """

    converted: dict[str, str] = field(default_factory=dict)
    left_dense: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    unchanged: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        kinds: dict[str, int] = {}
        for cls in self.converted.values():
            kinds[cls] = kinds.get(cls, 0) + 1
        by_kind = ", ".join(f"{n} {c}" for c, n in kinds.items())
        lines = [
            f"meProp convert: {len(self.converted)} layer(s) converted"
            + (f" ({by_kind})" if by_kind else "")
            + f", {len(self.left_dense)} left dense"
            + (f", {len(self.unchanged)} meProp layer(s) unchanged" if self.unchanged else "")
        ]
        for name, cls in self.converted.items():
            lines.append(f"  converted   {name or '(the model)'} ({cls})")
        for name, why in self.left_dense.items():
            lines.append(f"  left dense  {name or '(the model)'}: {why}")
        for name, why in self.unchanged.items():
            lines.append(f"  unchanged   {name or '(the model)'}: {why}")
        for name, note in self.notes.items():
            lines.append(f"  note        {name or '(the model)'}: {note}")
        return "\n".join(lines)


def _kind(module: nn.Module, lstm: bool) -> str | None:
    """"linear", "conv1d" or "lstm" for a layer convert swaps, else None."""
    t = type(module)
    if type_before_parametrizations(module) in (nn.Linear, MePropLinear):  # weight_norm'd too
        return "linear"
    if t is MePropConv1D or is_conv1d(module):
        return "conv1d"
    if lstm and t in (nn.LSTM, MePropLSTM):
        return "lstm"
    return None


def _why_not(module: nn.Module, lstm: bool) -> str | None:
    """Why a linear-like layer that convert does not swap stays dense (None: not one)."""
    t = type(module)
    before = type_before_parametrizations(module)
    if before is not t and (issubclass(before, nn.LSTM) or before.__name__ == "Conv1D"):
        return (f"a parametrized {before.__name__} (torch.nn.utils.parametrize); only a parametrized "
                f"nn.Linear is converted")
    if isinstance(module, nn.Linear):
        # A subclass may have a forward of its own that a swap would lose.
        return f"{before.__module__}.{before.__qualname__} is a subclass of nn.Linear (its forward may differ); not swapped"
    if isinstance(module, nn.LSTM):
        if t is MePropLSTM:
            return "a MePropLSTM: pass lstm=True to change its settings"
        if t is nn.LSTM:
            return "nn.LSTM: pass lstm=True to convert LSTMs"
        return f"{t.__qualname__} is a subclass of nn.LSTM; not swapped"
    if t.__name__ == "Conv1D":
        return "a class named Conv1D without transformers' layout (nf, weight (in, nf), bias (nf,)); not swapped"
    return None


#: Calls that compute with a weight they are handed: a layer whose weight its parent
#: passes to one of these computes (some of) its output without the layer's forward.
_PRODUCTS = frozenset({"linear", "matmul", "mm", "addmm", "bmm", "baddbmm", "einsum", "bilinear"})


@functools.lru_cache(maxsize=None)
def _weights_used_directly(cls: type) -> dict[str, tuple[str, bool]]:
    """Attribute names whose ``.weight`` ``cls.forward`` hands to a product itself
    (``F.linear(x, self.qkv.weight, bias)``, ``x @ self.proj.weight.t()``), each with
    the call and whether the forward also calls the layer (``self.qkv(x)``), read from
    the source of ``forward`` alone (not from helpers it calls, nor through aliases;
    empty where it cannot be read). timm's BEiT, EVA and Swin V2 attention call ``qkv``
    without a q/v bias and use ``F.linear(x, self.qkv.weight, bias)`` with one: there a
    meProp qkv never runs its own backward."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return {}

    def weight_of(node) -> str | None:  # `self.<name>.weight`, optionally `.t()` / `.T`
        while isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("t", "transpose"):
            node = node.func.value
        if isinstance(node, ast.Attribute) and node.attr == "T":
            node = node.value
        if (
            isinstance(node, ast.Attribute) and node.attr == "weight"
            and isinstance(node.value, ast.Attribute) and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
        ):
            return node.value.attr
        return None

    found: dict[str, str] = {}
    called: set[str] = set()
    for node in ast.walk(tree):
        operands = []
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in _PRODUCTS:
                operands = [*node.args, *(kw.value for kw in node.keywords)]
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "self":
                called.add(func.attr)  # self.<name>(...)
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
            operands = [node.left, node.right]
        for operand in operands:
            attr = weight_of(operand)
            if attr is not None:
                found.setdefault(attr, ast.unparse(node))
    return {attr: (call, attr in called) for attr, call in found.items()}


def _exclusion(exclude, names: list[str]) -> Callable[[str, nn.Module], object]:
    """``(name, module) -> truthy`` where ``exclude`` leaves the module dense: the user's
    predicate, or the first of the user's patterns that matches (None where none does)."""
    if exclude is None:
        return lambda name, module: False
    if callable(exclude):
        return exclude
    if isinstance(exclude, str):
        exclude = [exclude]
    if not isinstance(exclude, Iterable) or isinstance(exclude, (bytes, bytearray)):
        raise TypeError(
            "exclude must be a module name or pattern, a list of them, or a predicate "
            f"(name, module) -> bool; got {type(exclude).__name__} {exclude!r:.80}"
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

    def excluded(name: str, module: nn.Module) -> str | None:
        # A module is excluded when its name, or the name of a module it sits in, matches:
        # the first pattern that does, for the report.
        parts = name.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return next((p for p in patterns if any(fnmatch.fnmatchcase(q, p) for q in prefixes)), None)

    return excluded


def _swapped(module: nn.Module, kind: str, k, options: dict) -> nn.Module:
    if kind == "lstm":  # the options an LSTM takes; the rest are a Linear's
        return MePropLSTM.from_lstm(module, k=k, **{n: v for n, v in options.items() if n in _LSTM_OPTIONS})
    if kind == "conv1d":
        return MePropConv1D.from_conv1d(module, k=k, **options)
    return MePropLinear.from_linear(module, k=k, **options)


def _own_params(module: nn.Module, kind: str) -> tuple:
    return tuple(module._flat_weights_names) if kind == "lstm" else ("weight", "bias")


def _swapped_named(what: str, module: nn.Module, kind: str, k, options: dict) -> nn.Module:
    """``_swapped``, with a refusal's message naming the layer (``what``)."""
    try:
        return _swapped(module, kind, k, options)
    except (TypeError, ValueError, NotImplementedError) as e:
        raise type(e)(f"{what}: {e}") from None


def _places(model: nn.Module):
    """Every (qualified name, parent, attribute, child) in ``model``, shared children
    under each of their names, with the names in ``named_modules`` order."""
    out = []
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in parent._modules.items():  # named_children() skips repeats
            if child is None:
                continue
            out.append((f"{parent_name}.{child_name}" if parent_name else child_name, parent, child_name, child))
    return out


def _param_owners(model: nn.Module) -> tuple[dict[int, list[tuple[int, str]]], dict[int, str]]:
    """id(Parameter) -> (id(module), name there) of each module that registers it;
    id(module) -> its first qualified name."""
    owners: dict[int, list[tuple[int, str]]] = {}
    first: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in first:
            continue
        first[id(module)] = name
        for pname, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((id(module), pname))
    return owners, first


def _tied_with(module: nn.Module, owners, first) -> list[str]:
    """``"weight is transformer.wte.weight"`` for each parameter of this layer that
    another module also registers (tied embeddings)."""
    ties = []
    own = {id(module)}
    items = list(module._parameters.items())
    plist = module._modules.get("parametrizations")
    if plist is not None:  # a parametrized layer: its originals live in its parametrizations
        own.update(id(m) for m in plist.modules())
        items += [(f"{tensor}'s {n}", p) for tensor, pl in plist.items() for n, p in pl.named_parameters()]
    for pname, p in items:
        if p is None:
            continue
        others = [f"{first[o] + '.' if first[o] else ''}{n}" for o, n in owners.get(id(p), ()) if o not in own]
        if others:
            ties.append(f"{pname} is {' and '.join(others)}")
    return ties


def convert(
    model: nn.Module,
    *,
    k,
    exclude=None,
    lstm: bool = False,
    tied: str = "skip",
    report: bool = False,
    **options,
):
    """Swap every ``nn.Linear`` (and transformers ``Conv1D``) in ``model`` for a meProp
    layer, in place.

    Args:
        model: any module; returned, converted. A bare layer cannot be swapped in place,
            so a new meProp layer sharing its parameters is returned.
        k: as for ``MePropLinear`` (an int >= 1, or a fraction of each layer's output
            features in (0, 1]).
        exclude: layers to leave dense: qualified names as in ``model.named_modules()``
            (fnmatch patterns allowed; a name also excludes everything inside that
            module), or a predicate ``(name, module) -> bool``. The paper keeps the
            output layer dense: ``exclude=["classifier"]``.
        lstm: also swap every ``nn.LSTM`` for a ``MePropLSTM`` sharing its parameters
            (``k`` then counts units per gate of its hidden size; of the options only
            ``unified``, ``selection`` and ``sparse_grad`` apply to it).
        tied: ``"skip"`` (default): a layer whose weight or bias is also registered in
            another module (tied embeddings: GPT-2's ``lm_head.weight`` is
            ``transformer.wte.weight``) stays dense, and the report names the module it
            is tied to; ``"convert"``: convert it all the same (the shared Parameter
            then gets meProp's gradient from this layer plus the other module's own).
        report: False (default): return the model; True: return ``(model,
            ConversionReport)``, which says what was converted and what was left dense
            and why (``print(report)`` for a summary).
        options: ``unified``, ``selection``, ``sparse_grad``, ``backend``,
            ``track_selection``. ``sparse_grad=True`` is refused for a model with
            ``Conv1D`` layers to convert (exclude them, or use dense gradients).

    transformers' ``Conv1D`` (GPT-2's attention and MLP layers, weight stored
    ``(in, out)``) is recognised by its class name and layout, so transformers is not
    needed to import this package. The new layers share the old layers' Parameter
    objects, so an optimizer built before the conversion keeps working. Layers used
    inside ``nn.MultiheadAttention``, layers whose parent's ``forward`` hands their weight
    to a product itself and never calls them (``F.linear(x, self.qkv.weight, b)``, read
    from its source; one it also calls is converted, with a note in the report) and
    subclasses of ``nn.Linear`` are left alone; a parametrized ``nn.Linear``
    (``torch.nn.utils.parametrize``) is converted with its parametrizations. A
    layer shared between several places stays shared (excluded under any of its names,
    it stays dense everywhere). A ``UserWarning`` says so when nothing was converted.
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
    if tied not in _TIED:
        raise ValueError(f"tied must be 'skip' or 'convert'; got {tied!r}")
    if not isinstance(report, bool):
        raise TypeError(f"report must be True or False; got {report!r}")

    names = [n for n, _ in model.named_modules(remove_duplicate=False)]
    excluded = _exclusion(exclude, names)
    owners, first = _param_owners(model)
    summary = ConversionReport()

    places = [("", None, None, model)] + _places(model)
    inside_mha = set()
    for _, _, _, module in places:
        if isinstance(module, nn.MultiheadAttention):
            inside_mha.update(id(m) for m in module.modules() if m is not module)

    # Decide everything first, then swap: a refused call changes nothing.
    candidates = []  # (name, parent, attribute, child, kind)
    kept: dict[int, str] = {}  # id(layer) -> why it stays dense
    notes: dict[int, str] = {}  # id(layer) -> a caveat about converting it
    seen: set[int] = set()
    for name, parent, attr, child in places:
        kind = _kind(child, lstm)
        if id(child) in inside_mha:
            if kind is not None or _why_not(child, lstm) is not None:
                kept.setdefault(id(child), "inside nn.MultiheadAttention, which uses its weight without calling the layer")
        elif kind is None:
            why = _why_not(child, lstm)
            if why is not None:
                kept.setdefault(id(child), why)
        else:
            candidates.append((name, parent, attr, child, kind))
            lost = _lost_in_swap(child, _own_params(child, kind))
            direct = None if parent is None else _weights_used_directly(type(parent)).get(attr)
            if direct is not None:
                call, also_called = direct
                call = call if len(call) <= 90 else call[:87] + "..."
            hit = excluded(name, child)
            if hit:
                by = "by the exclude predicate" if callable(exclude) else f"by {hit!r}"
                kept[id(child)] = f"excluded ({by})"
            elif lost is not None:
                kept.setdefault(id(child), f"{lost}; not swapped")
            elif direct is not None and not also_called:
                kept.setdefault(
                    id(child),
                    f"{type(parent).__qualname__}.forward uses its weight without calling the layer "
                    f"(`{call}`); not swapped",
                )
            elif direct is not None:
                notes.setdefault(
                    id(child),
                    f"{type(parent).__qualname__}.forward calls it, but in some cases uses its weight "
                    f"without calling it (`{call}`): where that runs, its backward is dense",
                )
            elif id(child) not in kept and id(child) not in seen and tied == "skip":
                others = _tied_with(child, owners, first)
                if others:
                    kept[id(child)] = (
                        f"tied: its {', '.join(others)} too; pass tied='convert' to convert it anyway"
                    )
        seen.add(id(child))
    swaps = [c for c in candidates if id(c[3]) not in kept]
    if options.get("sparse_grad") and any(kind == "conv1d" for *_, kind in swaps):
        conv = [name for name, *_, kind in swaps if kind == "conv1d"]
        raise ValueError(
            f"sparse_grad=True is not supported for Conv1D layers (their kept units are "
            f"columns of a weight stored (in, out), which a row-sparse gradient cannot hold); "
            f"this model has {len(conv)} to convert ({', '.join(conv[:3])}{', ...' if len(conv) > 3 else ''}): "
            f"exclude them, or use sparse_grad=False"
        )
    replacement: dict[int, nn.Module] = {}
    for name, _, _, child, kind in swaps:
        if id(child) not in replacement:
            replacement[id(child)] = _swapped_named(f"cannot convert {name or 'the model'}", child, kind, k, options)
            summary.converted[name] = type(child).__name__
            if id(child) in notes:
                summary.notes[name] = notes[id(child)]
    result = model
    for _, parent, attr, child, _ in swaps:
        if parent is None:
            result = replacement[id(child)]
        else:
            setattr(parent, attr, replacement[id(child)])
    for _, _, _, module in places:
        why = kept.pop(id(module), None)
        if why is not None:
            meprop = type_before_parametrizations(module) in (MePropLinear, MePropConv1D, MePropLSTM)
            (summary.unchanged if meprop else summary.left_dense)[first.get(id(module), "")] = why
    if not summary.converted:
        left = {**summary.left_dense, **summary.unchanged}
        detail = (
            "; ".join(f"{n or '(the model)'}: {w}" for n, w in list(left.items())[:4])
            if left
            else "it has no layer that convert swaps (nn.Linear, transformers Conv1D, and nn.LSTM with lstm=True)"
        )
        warnings.warn(f"convert changed nothing in this {type(model).__name__}: {detail}", UserWarning, stacklevel=2)
    return (result, summary) if report else result


# --- saving and loading -------------------------------------------------------------------

_TYPES = {"MePropLinear": "linear", "MePropConv1D": "conv1d", "MePropLSTM": "lstm"}


def _plain(k):
    """k as a Python int or float, which ``json`` writes (a numpy int or a Fraction it
    does not); the float is what the layer resolves a fractional k from anyway."""
    return int(k) if isinstance(k, numbers.Integral) else float(k)


def meprop_settings(model: nn.Module) -> dict[str, dict]:
    """The meProp layers of ``model`` and their settings, as a JSON-ready dict.

    ``{qualified name: {"type": "MePropLinear" | "MePropConv1D" | "MePropLSTM", "k": ...,
    "unified": ..., "selection": ..., ...}}`` (``sparse_grad``, ``backend`` and
    ``track_selection`` for the linear layers too), one entry per layer, under its first
    name. Save it beside the weights (``json.dump``, or ``model.config.meprop = ...``
    before transformers' ``save_pretrained``); :func:`apply_settings` redoes the
    conversion on a model loaded dense.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"meprop_settings expects an nn.Module; got {type(model).__name__}")
    out = {}
    for name, module in model.named_modules():
        t = type_before_parametrizations(module)
        if t in (MePropLinear, MePropConv1D):
            out[name] = {"type": t.__name__, "k": _plain(module.k), **{o: getattr(module, o) for o in _OPTIONS}}
        elif t is MePropLSTM:
            out[name] = {"type": t.__name__, "k": _plain(module.k), **{o: getattr(module, o) for o in _LSTM_OPTIONS}}
    return out


def _typed(setting: Mapping) -> dict:
    return {o: (isinstance(v, numbers.Integral), v) for o, v in setting.items()}


def apply_settings(model: nn.Module, settings: Mapping[str, Mapping]) -> nn.Module:
    """Convert the layers named in ``settings`` (what :func:`meprop_settings` returned for
    a converted model) with their recorded settings, in place, and return the model.

    The use: a converted model saved with ``state_dict`` / ``save_pretrained`` loads back
    dense (plain ``nn.Linear`` / ``Conv1D``); ``apply_settings(loaded, settings)`` makes it
    the converted model again, the same layers with the same settings. Every entry is
    checked first (the name exists, its layer is of the recorded kind, the settings are
    valid); nothing is changed when one is refused. Layers not named stay as they are.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_settings expects an nn.Module; got {type(model).__name__}")
    if not isinstance(settings, Mapping):
        raise TypeError(f"settings must be a dict {{module name: settings}} from meprop_settings; got {type(settings).__name__}")
    plan = []
    for name, entry in settings.items():
        if not isinstance(name, str) or not isinstance(entry, Mapping):
            raise TypeError(f"settings must map module names to dicts; got {name!r}: {entry!r}")
        kind = _TYPES.get(entry.get("type")) if isinstance(entry.get("type"), str) else None
        if kind is None:
            raise ValueError(f"settings[{name!r}]['type'] must be one of {', '.join(_TYPES)}; got {entry.get('type')!r}")
        allowed = {"type", "k", *(_LSTM_OPTIONS if kind == "lstm" else _OPTIONS)}
        extra = set(entry) - allowed
        if extra or "k" not in entry:
            raise ValueError(
                f"settings[{name!r}] must have 'k' and only {', '.join(sorted(allowed))}; "
                + (f"got unexpected {', '.join(sorted(extra))}" if extra else "'k' is missing")
            )
        options = {o: v for o, v in entry.items() if o not in ("type", "k")}
        check_k(entry["k"], {"linear": "out_features", "conv1d": "nf", "lstm": "hidden_size"}[kind])
        check_options(**options)
        if kind == "conv1d" and options.get("sparse_grad"):
            raise ValueError(f"settings[{name!r}]: sparse_grad=True is not supported for Conv1D layers")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"settings name a module {name!r} that this {type(model).__name__} does not have") from None
        if _kind(module, lstm=True) != kind:
            raise ValueError(
                f"settings[{name!r}] record a {entry['type']}, but this model's {name!r} is a "
                f"{type(module).__name__}, which cannot become one"
            )
        lost = _lost_in_swap(module, _own_params(module, kind))
        if lost is not None:
            raise ValueError(f"settings[{name!r}]: this model's {name!r} cannot be swapped: {lost}")
        setting = {"k": entry["k"], **options}
        for other, other_module, _, other_setting in plan:
            if other_module is module and _typed(other_setting) != _typed(setting):  # k=1 is not k=1.0
                raise ValueError(
                    f"settings[{other!r}] and settings[{name!r}] name one shared layer with different "
                    f"settings ({other_setting} and {setting}); give it one entry"
                )
        plan.append((name, module, kind, setting))
    # Build every new layer first (from_linear / from_lstm may still refuse a layer, e.g. a
    # pruned weight or an LSTM with proj_size), then swap: a refused call changes nothing.
    new_for: dict[int, nn.Module] = {}
    for name, module, kind, setting in plan:
        if id(module) not in new_for:
            options = {o: v for o, v in setting.items() if o != "k"}
            new_for[id(module)] = _swapped_named(f"settings[{name!r}]", module, kind, setting["k"], options)
    # Every place each layer sits in (a shared layer is swapped everywhere, and stays shared).
    result = model
    for _, parent, attr, child in _places(model):
        if id(child) in new_for:
            setattr(parent, attr, new_for[id(child)])
    if id(model) in new_for:
        result = new_for[id(model)]
    return result
