"""meSimp: model simplification from meProp's selection statistics.

Sun et al., "Training Simplification and Model Simplification for Deep Learning: A
Minimal Effort Back Propagation Method": per hidden layer, ``hit[j]`` counts the rows
(examples) whose kept set held unit j and ``refer`` the rows seen since the last prune.
A prune keeps unit j iff ``hit[j] >= floor(refer * prune)``, removes the others for good
and resets the counters. Here the layer shrinks physically: its weight rows and bias
entries, the input columns of the layer that consumes its output (and a ``BatchNorm1d``
in between), and the optimizer state of all of them. The function of the kept units is
unchanged: after a prune the model computes what the unpruned model computes with the
removed units' outputs set to zero.

    simp = Simplifier(model, optimizer, prune=0.1)   # turns on the layers' statistics
    ...train...
    simp.step()                                       # prune, shrink, reset the counters
    simp.dims()                                       # {"0": 154, "2": 160}
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .nn import MePropLinear

__all__ = ["Simplifier", "ELEMENTWISE"]

#: Modules that act on each feature independently (with no per-feature parameters), so
#: removing a feature leaves the others unchanged. Found between a producer and its
#: consumer inside an ``nn.Sequential``, they are stepped over.
ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Identity,
    nn.Dropout, nn.AlphaDropout, nn.FeatureAlphaDropout,
)

#: Optimizers whose state is per element of a parameter (tensors of its shape) plus
#: scalars, which can be sliced with it.
SLICEABLE_OPTIMIZERS = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad,
    torch.optim.SparseAdam, torch.optim.RMSprop, torch.optim.Adamax, torch.optim.NAdam,
    torch.optim.RAdam, torch.optim.Adadelta, torch.optim.Rprop, torch.optim.ASGD,
)


@dataclass
class _Pair:
    producer: str
    consumer: str
    norms: list = field(default_factory=list)  # names of BatchNorm1d modules in between


def _check_prune(prune) -> float:
    if isinstance(prune, bool) or not isinstance(prune, numbers.Real) or not 0.0 <= float(prune) <= 1.0:
        raise ValueError(f"prune must be a number in [0, 1] (the paper's 0.1); got {prune!r}")
    return float(prune)


class Simplifier:
    """Prune and physically shrink the hidden meProp layers of ``model`` (meSimp).

    Args:
        model: the model; its hidden layers must be ``MePropLinear`` (``convert`` them).
        optimizers: an optimizer or a list of them, over the model's parameters; each
            prune points their param groups to the new, smaller parameters and slices
            their state (Adam's ``exp_avg`` / ``exp_avg_sq``, Adagrad's ``sum``, SGD's
            ``momentum_buffer``, ...). Only optimizers whose state is per element
            (:data:`SLICEABLE_OPTIMIZERS`) are accepted.
        prune: the threshold share of rows a unit must be kept in, in ``[0, 1]``.
        pairs: None to find the (producer, consumer) pairs in every ``nn.Sequential``:
            a ``MePropLinear`` followed, after element-wise modules (:data:`ELEMENTWISE`)
            and ``BatchNorm1d`` layers, by an ``nn.Linear``. Otherwise a list of
            ``(producer, consumer)`` or ``(producer, consumer, [batchnorm, ...])`` module
            names (as in ``model.named_modules()``), for models whose layers are not
            chained in a Sequential. The layer that reads a producer's output must be
            its consumer alone (a residual connection around it cannot be shrunk).
        min_units: no layer drops below this many units.

    Creating a Simplifier turns on ``track_selection`` in every producer (counters at
    zero). ``step()`` prunes; ``dims()`` gives the current sizes. Every argument is
    checked before anything changes.
    """

    def __init__(self, model: nn.Module, optimizers=(), *, prune: float = 0.1, pairs=None, min_units: int = 1):
        if not isinstance(model, nn.Module):
            raise TypeError(f"Simplifier expects an nn.Module; got {type(model).__name__}")
        self.prune = _check_prune(prune)
        if isinstance(min_units, bool) or not isinstance(min_units, numbers.Integral) or min_units < 1:
            raise ValueError(f"min_units must be an int >= 1; got {min_units!r}")
        self.min_units = int(min_units)
        optimizers = _checked_optimizers(optimizers)
        self.model = model
        self._optimizers = optimizers
        self._modules = dict(model.named_modules())
        self.pairs = self._find_pairs() if pairs is None else self._named_pairs(pairs)
        if not self.pairs:
            raise ValueError(
                "Simplifier found no layer to simplify: it needs a MePropLinear whose output "
                "feeds an nn.Linear (in an nn.Sequential, or named in pairs=[(producer, consumer)])"
            )
        places: dict[int, list[str]] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            places.setdefault(id(module), []).append(name)
        for pair in self.pairs:
            for role, name in (("producer", pair.producer), ("consumer", pair.consumer)):
                if "parametrizations" in self._modules[name]._modules:
                    raise TypeError(
                        f"Simplifier cannot shrink {role} '{name}': its weight is computed by a "
                        f"parametrization (torch.nn.utils.parametrize), whose originals meSimp cannot "
                        f"cut; remove it first (parametrize.remove_parametrizations(layer, 'weight')), "
                        f"or name the pairs to simplify with pairs=[...] and leave this one out"
                    )
            for name in (pair.producer, pair.consumer, *pair.norms):
                where = places.get(id(self._modules[name]), [])
                if len(where) > 1:
                    raise ValueError(
                        f"Simplifier cannot shrink '{name}': the same module is used in "
                        f"{len(where)} places ({', '.join(where)}), and shrinking it for one would "
                        f"break the others; give each place its own layer, or name the pairs "
                        f"to simplify with pairs=[...] and leave this one out"
                    )
        for pair in self.pairs:
            self._modules[pair.producer].track_selection = True
            self._modules[pair.producer].reset_selection_stats()
        self.history: list[dict] = [self.dims()]

    @property
    def optimizers(self) -> list:
        """The optimizers each prune updates. Assign new ones (an optimizer or a list)
        when the training loop rebuilds its optimizer (meSimp's schedule re-initialises
        Adam at the end of each cycle); they are checked as in the constructor."""
        return self._optimizers

    @optimizers.setter
    def optimizers(self, value) -> None:
        self._optimizers = _checked_optimizers(value)

    # --- finding the layers -------------------------------------------------------------

    def _find_pairs(self) -> list[_Pair]:
        pairs = []
        for seq_name, seq in self.model.named_modules():
            if not isinstance(seq, nn.Sequential):
                continue
            children = list(seq.named_children())
            for i, (name, module) in enumerate(children):
                if not isinstance(module, MePropLinear):
                    continue
                norms = []
                for nxt_name, nxt in children[i + 1:]:
                    full = f"{seq_name}.{nxt_name}" if seq_name else nxt_name
                    if isinstance(nxt, nn.Linear):
                        producer = f"{seq_name}.{name}" if seq_name else name
                        pairs.append(_Pair(producer, full, norms))
                        break
                    if isinstance(nxt, nn.BatchNorm1d):
                        norms.append(full)
                    elif isinstance(nxt, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm) if hasattr(nn, "RMSNorm")
                                    else (nn.LayerNorm, nn.GroupNorm)):
                        raise ValueError(
                            f"Simplifier cannot shrink through {type(nxt).__name__} '{full}': it normalizes "
                            f"across features, so removing units would change the kept ones; name the pairs "
                            f"to simplify with pairs=[...] and leave this one out"
                        )
                    elif not isinstance(nxt, ELEMENTWISE):
                        break  # something that mixes features: no consumer to shrink
        return pairs

    def _named_pairs(self, pairs) -> list[_Pair]:
        if isinstance(pairs, (str, bytes)) or not hasattr(pairs, "__iter__"):
            raise TypeError(f"pairs must be a list of (producer, consumer) names; got {pairs!r}")
        out = []
        for entry in pairs:
            if not isinstance(entry, (tuple, list)) or len(entry) not in (2, 3):
                raise TypeError(
                    f"each entry of pairs must be (producer, consumer) or (producer, consumer, "
                    f"[batchnorm names]); got {entry!r}"
                )
            producer, consumer, *rest = entry
            norms = list(rest[0]) if rest else []
            for role, name in [("producer", producer), ("consumer", consumer)] + [("norm", n) for n in norms]:
                if name not in self._modules or name == "":
                    raise ValueError(
                        f"{role} {name!r} is not a module of the model; names are as in "
                        f"model.named_modules(), e.g. {list(self._modules)[1:5]}"
                    )
            if not isinstance(self._modules[producer], MePropLinear):
                raise TypeError(
                    f"producer {producer!r} must be a MePropLinear (its selections are the "
                    f"statistics); got {type(self._modules[producer]).__name__}"
                )
            if not isinstance(self._modules[consumer], nn.Linear):
                raise TypeError(f"consumer {consumer!r} must be an nn.Linear; got {type(self._modules[consumer]).__name__}")
            for n in norms:
                if not isinstance(self._modules[n], nn.BatchNorm1d):
                    raise TypeError(f"only BatchNorm1d can sit between a pair; {n!r} is {type(self._modules[n]).__name__}")
            p, c = self._modules[producer], self._modules[consumer]
            if p is c:
                raise ValueError(
                    f"producer {producer!r} and consumer {consumer!r} are one layer; a pair is a layer and "
                    f"the next layer that reads its output"
                )
            for earlier in out:
                if self._modules[earlier.producer] is p:
                    raise ValueError(
                        f"producer {producer!r} is in two pairs ({earlier.producer!r} -> {earlier.consumer!r} and "
                        f"{producer!r} -> {consumer!r}); the layer that reads a producer's output must be its "
                        f"consumer alone"
                    )
            if c.in_features != p.out_features:
                raise ValueError(
                    f"consumer {consumer!r} takes {c.in_features} inputs but producer {producer!r} "
                    f"gives {p.out_features} outputs"
                )
            out.append(_Pair(producer, consumer, norms))
        return out

    # --- reading ------------------------------------------------------------------------

    def dims(self) -> dict:
        """The current output sizes of the simplified layers, by name (in pair order)."""
        return {pair.producer: self._modules[pair.producer].out_features for pair in self.pairs}

    def keep_masks(self) -> dict:
        """The units each producer would keep if ``step()`` ran now (bool tensors)."""
        masks = {}
        for pair in self.pairs:
            stats = self._modules[pair.producer].selection_stats()
            threshold = math.floor(stats.rows * self.prune)
            keep = stats.hits >= threshold
            if int(keep.sum()) < self.min_units:
                # the most-selected units, ties to the lower index
                order = torch.sort(stats.hits, descending=True, stable=True).indices[: self.min_units]
                keep = torch.zeros_like(keep)
                keep[order] = True
            masks[pair.producer] = keep
        return masks

    # --- pruning ------------------------------------------------------------------------

    def step(self) -> dict:
        """Prune every producer by the rule, shrink it and its consumer (and the optimizer
        state), reset the counters. Returns ``{producer: (units before, units after)}``."""
        masks = self.keep_masks()
        # Every parameter's new rows / columns, worked out (and the optimizer state
        # checked) before anything changes.
        rows: dict[nn.Module, Tensor] = {}
        cols: dict[nn.Module, Tensor] = {}
        norms: dict[nn.Module, Tensor] = {}
        for pair in self.pairs:
            if bool(masks[pair.producer].all()):
                continue  # nothing to remove here
            keep = masks[pair.producer].nonzero().flatten()
            producer = self._modules[pair.producer]
            rows[producer] = keep.to(producer.weight.device)
            consumer = self._modules[pair.consumer]
            cols[consumer] = keep.to(consumer.weight.device)
            for n in pair.norms:
                norms[self._modules[n]] = keep
        plan = []  # (module, attribute, old parameter, row index, column index)
        for module in {**dict.fromkeys(rows), **dict.fromkeys(cols)}:
            r, c = rows.get(module), cols.get(module)
            plan.append((module, "weight", module.weight, r, c))
            if module.bias is not None and r is not None:
                plan.append((module, "bias", module.bias, r, None))
        for module, keep in norms.items():
            for attr in ("weight", "bias"):
                if getattr(module, attr, None) is not None:
                    plan.append((module, attr, getattr(module, attr), keep.to(getattr(module, attr).device), None))
        for _, _, param, _, _ in plan:
            self._check_state(param)

        before = self.dims()
        for module, attr, old, r, c in plan:
            new = nn.Parameter(_slice(old.detach(), r, c).clone(), requires_grad=old.requires_grad)
            setattr(module, attr, new)
            self._swap_in_optimizers(old, new, r, c)
        for module, keep in norms.items():
            for buf in ("running_mean", "running_var"):
                t = getattr(module, buf, None)
                if t is not None:
                    setattr(module, buf, t[keep.to(t.device)].clone())
            module.num_features = int(keep.numel())
        for module in rows:
            module.out_features = module.weight.shape[0]
        for module in cols:
            module.in_features = module.weight.shape[1]
        for pair in self.pairs:  # counters of the new size, at zero
            producer = self._modules[pair.producer]
            producer.track_selection = False
            producer.track_selection = True
        after = self.dims()
        self.history.append(after)
        return {name: (before[name], after[name]) for name in before}

    def _check_state(self, param: Tensor) -> None:
        for opt in self.optimizers:
            state = opt.state.get(param)
            if not state:
                continue
            for key, value in state.items():
                if isinstance(value, Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise RuntimeError(
                        f"{type(opt).__name__}'s state {key!r} for a parameter of shape "
                        f"{tuple(param.shape)} has shape {tuple(value.shape)}: Simplifier cannot slice it"
                    )

    def _swap_in_optimizers(self, old: Tensor, new: nn.Parameter, r, c) -> None:
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["params"] = [new if p is old else p for p in group["params"]]
            state = opt.state.pop(old, None)
            if state is not None:
                opt.state[new] = {
                    key: _slice(v, r, c).clone() if isinstance(v, Tensor) and v.dim() > 0 else v
                    for key, v in state.items()
                }

    def close(self) -> None:
        """Stop keeping statistics in the producers (the model stays as simplified)."""
        for pair in self.pairs:
            self._modules[pair.producer].track_selection = False


def _checked_optimizers(optimizers) -> list:
    if isinstance(optimizers, torch.optim.Optimizer):
        optimizers = [optimizers]
    if not hasattr(optimizers, "__iter__"):
        raise TypeError(f"optimizers must be an optimizer or a list of them; got {type(optimizers).__name__}")
    optimizers = list(optimizers)
    for opt in optimizers:
        if not isinstance(opt, SLICEABLE_OPTIMIZERS):
            raise TypeError(
                f"Simplifier cannot slice the state of {type(opt).__name__}: it handles "
                f"optimizers with per-element state ({', '.join(c.__name__ for c in SLICEABLE_OPTIMIZERS)})"
            )
    return optimizers


def _slice(t: Tensor, rows, cols) -> Tensor:
    if t.is_sparse:
        t = t.to_dense()
    if rows is not None:
        t = t.index_select(0, rows.to(t.device))
    if cols is not None:
        t = t.index_select(1, cols.to(t.device))
    return t
