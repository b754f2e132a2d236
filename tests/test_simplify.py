"""meSimp: selection statistics (torch path) and the Simplifier."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from meprop_triton import MePropLinear, Simplifier, convert, meprop_linear, reference


def _grads_and_backward(layer, x, seed=0):
    gen = torch.Generator().manual_seed(seed)
    y = layer(x)
    g = torch.randn(y.shape, generator=gen, dtype=y.dtype)
    y.backward(g)
    return g.reshape(-1, layer.out_features)


def _expected_counts(idx_sets, out):
    """An independent count: per unit, the rows whose set holds it."""
    hits = torch.zeros(out, dtype=torch.int64)
    for row_set in idx_sets:
        for j in set(row_set.tolist()):
            hits[j] += 1
    return hits


@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("unified", [True, False], ids=["unified", "per-example"])
def test_statistics_count_the_selected_rows(unified, sparse_grad):
    torch.manual_seed(0)
    layer = MePropLinear(9, 40, k=7, unified=unified, sparse_grad=sparse_grad, track_selection=True)
    hits = torch.zeros(40, dtype=torch.int64)
    rows = 0
    for step in range(3):
        x = torch.randn(2, 5, 9, requires_grad=True)  # 10 rows, leading dims flattened
        g = _grads_and_backward(layer, x, seed=step)
        if unified:
            idx = reference.unified_topk_indices(g, 7)
            sets = [idx] * g.shape[0]
        else:
            sets = list(reference.per_example_topk_indices(g, 7))
        hits += _expected_counts(sets, 40)
        rows += g.shape[0]
    stats = layer.selection_stats()
    assert stats.rows == rows == 30
    assert torch.equal(stats.hits, hits)
    assert torch.allclose(stats.hit_rate, hits.double() / rows)
    assert int(stats.hits.sum()) == 7 * rows  # every row keeps exactly k units
    layer.reset_selection_stats()
    stats = layer.selection_stats()
    assert stats.rows == 0 and int(stats.hits.abs().sum()) == 0


def test_statistics_random_selection_and_dense_k():
    """Random-k: each row still keeps k units; k >= out: every unit is kept by every row."""
    torch.manual_seed(1)
    layer = MePropLinear(6, 12, k=4, selection="random", unified=False, track_selection=True)
    _grads_and_backward(layer, torch.randn(5, 6, requires_grad=True))
    stats = layer.selection_stats()
    assert stats.rows == 5 and int(stats.hits.sum()) == 20 and int(stats.hits.max()) <= 5
    dense = MePropLinear(6, 12, k=12, track_selection=True)
    _grads_and_backward(dense, torch.randn(5, 6, requires_grad=True))
    assert torch.equal(dense.selection_stats().hits, torch.full((12,), 5))


def test_no_count_when_only_the_bias_needs_a_gradient():
    """As on the Triton backend: a backward that computes neither grad_x nor grad_W
    decides nothing, and counts nothing."""
    layer = MePropLinear(6, 12, k=4, track_selection=True)
    layer.weight.requires_grad_(False)
    layer(torch.randn(5, 6)).sum().backward()
    assert layer.selection_stats().rows == 0 and layer.bias.grad is not None


def test_statistics_are_off_by_default_and_stay_out_of_state_dict():
    layer = MePropLinear(4, 6, k=2)
    assert not layer.track_selection and "selection_counts" not in dict(layer.named_buffers())
    with pytest.raises(RuntimeError, match="track_selection"):
        layer.selection_stats()
    layer.track_selection = True
    assert set(layer.state_dict()) == {"weight", "bias"}  # nn.Linear's state_dict
    assert "track_selection=True" in repr(layer)
    with pytest.raises(TypeError, match="track_selection must be True or False"):
        layer.track_selection = 1
    assert layer.track_selection  # the refused value changed nothing
    converted = convert(nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2)), k=2, track_selection=True, exclude=["1"])
    assert converted[0].track_selection and isinstance(converted[1], nn.Linear)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_statistics_start_at_zero_after_meta_init_and_to_empty(kind):
    """Counters made on the meta device hold no counts; ``to_empty`` gives them memory
    that held anything (here: 7s), and they must start at zero there. A later move keeps
    the counts."""
    from meprop_triton import MePropConv1D

    with torch.device("meta"):
        layer = MePropLinear(6, 10, k=3, track_selection=True) if kind == "linear" else MePropConv1D(10, 6, k=3, track_selection=True)
    layer._apply(lambda t: torch.full_like(t, 7, device="cpu"))  # to_empty, with dirty memory
    assert layer.selection_stats().rows == 0 and not layer.selection_stats().hits.any()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    layer(torch.randn(5, 6)).pow(2).sum().backward()
    assert layer.selection_stats().rows == 5 and int(layer.selection_stats().hits.sum()) == 15
    layer.double()
    assert layer.selection_stats().rows == 5  # a move from real memory keeps the counts
    with torch.device("meta"):
        other = MePropLinear(6, 10, k=3, track_selection=True)
    assert other.to_empty(device="cpu").selection_stats().rows == 0
    with torch.device("meta"):  # real parameters by load_state_dict(assign=True): no _apply
        assigned = MePropLinear(6, 10, k=3, track_selection=True) if kind == "linear" else MePropConv1D(10, 6, k=3, track_selection=True)
    state = {name: torch.randn(p.shape) for name, p in assigned.named_parameters()}
    assigned.load_state_dict(state, assign=True)
    assigned(torch.randn(4, 6)).pow(2).sum().backward()
    assert assigned.selection_stats().rows == 4 and int(assigned.selection_stats().hits.sum()) == 12


@pytest.mark.parametrize("shared", ["producer", "consumer"])
def test_a_layer_used_in_two_places_is_refused_before_any_change(shared):
    """Shrinking a module that a Sequential uses twice would break its other place: the
    Simplifier refuses it, naming the places, and leaves the model as it was."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    if shared == "producer":
        model = nn.Sequential(layer, nn.ReLU(), layer, nn.ReLU(), nn.Linear(8, 3))
        convert(model, k=2, exclude=["4"])
    else:
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), layer, nn.ReLU(), layer, nn.ReLU(), nn.Linear(8, 3))
        convert(model, k=2, exclude=["2", "6"])
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match=r"the same module is used in 2 places"):
        Simplifier(model, opt, prune=0.5)
    assert not any(getattr(m, "track_selection", False) for m in model.modules())


def test_meprop_linear_counts_checked():
    w = torch.randn(5, 3, requires_grad=True)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"counts must be an int64 tensor of shape \(6,\)"):
        meprop_linear(x, w, k=2, counts=torch.zeros(5, dtype=torch.int64))
    counts = torch.zeros(6, dtype=torch.int64)
    meprop_linear(x, w, k=2, counts=counts).sum().backward()
    assert int(counts[-1]) == 4 and int(counts[:-1].sum()) == 8


# --- the Simplifier -----------------------------------------------------------------


def _mlp(dims=(20, 30, 25, 5), k=6, norm=False, act=nn.ReLU):
    torch.manual_seed(0)
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            if norm:
                layers.append(nn.BatchNorm1d(b))
            layers += [act(), nn.Dropout(0.0)]
    model = nn.Sequential(*layers).double()
    return convert(model, k=k, exclude=[str(len(layers) - 1)])


def _train(model, opt, steps=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    d_in = model[0].in_features
    for _ in range(steps):
        x = torch.randn(16, d_in, generator=gen, dtype=torch.double)
        y = torch.randint(0, 5, (16,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _masked(model, masks, consumers):
    """The unpruned model with the removed units' outputs set to zero (the consumer's
    columns of them zeroed)."""
    ref = copy.deepcopy(model)
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for producer, keep in masks.items():
            mods[consumers[producer]].weight[:, ~keep] = 0
    return ref


def test_keep_rule_and_counter_reset():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    simp = Simplifier(model, opt, prune=0.3)
    _train(model, opt)
    for pair in simp.pairs:
        stats = getattr(model, pair.producer).selection_stats()
        want = stats.hits >= math.floor(stats.rows * 0.3)
        assert torch.equal(simp.keep_masks()[pair.producer], want)
    masks = simp.keep_masks()
    change = simp.step()
    for name, keep in masks.items():
        assert change[name] == (keep.numel(), int(keep.sum()))
        layer = getattr(model, name)
        assert layer.out_features == int(keep.sum()) == layer.weight.shape[0]
        stats = layer.selection_stats()
        assert stats.rows == 0 and stats.hits.shape == (layer.out_features,)
    assert simp.dims() == {name: int(keep.sum()) for name, keep in masks.items()}
    assert simp.history[-1] == simp.dims() and len(simp.history) == 2


def test_prune_removes_something_and_min_units():
    model = _mlp(k=3)
    opt = torch.optim.Adam(model.parameters())
    simp = Simplifier(model, opt, prune=1.0, min_units=4)  # only units kept by every row survive
    _train(model, opt, steps=3)
    simp.step()
    for size in simp.dims().values():
        assert 4 <= size <= 25


@pytest.mark.parametrize("act", [nn.ReLU, nn.Sigmoid], ids=["relu", "sigmoid"])
def test_function_preserved_sequential_chain(act):
    model = _mlp(act=act)
    opt = torch.optim.Adam(model.parameters())
    simp = Simplifier(model, opt, prune=0.3)
    _train(model, opt)
    masks = simp.keep_masks()
    assert any(not bool(m.all()) for m in masks.values())
    ref = _masked(model, masks, {p.producer: p.consumer for p in simp.pairs})
    x = torch.randn(7, 20, dtype=torch.double)
    simp.step()
    model.eval(), ref.eval()
    torch.testing.assert_close(model(x), ref(x), rtol=1e-12, atol=1e-12)


class _TwoBranch(nn.Module):
    """Not a Sequential: the pair is named explicitly, with a BatchNorm1d in between."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = MePropLinear(12, 30, k=5, dtype=torch.double)
        self.norm = nn.BatchNorm1d(30, dtype=torch.double)
        self.out = nn.Linear(30, 3, dtype=torch.double)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x))))


def test_function_preserved_explicit_pair_with_batchnorm():
    model = _TwoBranch()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    simp = Simplifier(model, opt, prune=0.4, pairs=[("inp", "out", ["norm"])])
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        x = torch.randn(16, 12, generator=gen, dtype=torch.double)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    masks = simp.keep_masks()
    assert not bool(masks["inp"].all())
    ref = _masked(model, masks, {"inp": "out"})
    model.eval(), ref.eval()
    x = torch.randn(9, 12, dtype=torch.double)
    simp.step()
    n = int(masks["inp"].sum())
    assert model.norm.num_features == n and model.norm.running_mean.shape == (n,)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("opt_name", ["adam", "adamw", "sgd-momentum", "adagrad"])
def test_optimizer_state_sliced(opt_name):
    """An optimizer step after a prune equals the step of the unpruned model's optimizer on
    the kept entries (the removed ones' gradients are what a masked model would give)."""
    make = {
        "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
        "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        "sgd-momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
        "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
    }[opt_name]
    model = _mlp()
    opt = make(model.parameters())
    simp = Simplifier(model, opt, prune=0.3)
    _train(model, opt)
    masks = simp.keep_masks()
    assert any(not bool(m.all()) for m in masks.values())
    twin, twin_opt = copy.deepcopy((model, opt))  # the unpruned model and its optimizer
    consumers = {p.producer: p.consumer for p in simp.pairs}
    simp.step()
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(16, 20, generator=gen, dtype=torch.double)
    y = torch.randint(0, 5, (16,), generator=gen)
    # the twin, masked: removed units contribute nothing, so kept entries get the same gradients
    tm = dict(twin.named_modules())
    with torch.no_grad():
        for producer, keep in masks.items():
            tm[consumers[producer]].weight[:, ~keep] = 0
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
    # the consumer columns zeroed in the twin would get gradients (and momentum) of their own;
    # compare only the kept entries
    opt.step()
    twin_opt.step()
    mods = dict(model.named_modules())
    rows = {name: keep.nonzero().flatten() for name, keep in masks.items()}
    cols = {consumers[name]: keep.nonzero().flatten() for name, keep in masks.items()}
    for name, module in mods.items():
        if not isinstance(module, nn.Linear):
            continue
        want_w, want_b = tm[name].weight, tm[name].bias
        if name in rows:
            want_w, want_b = want_w[rows[name]], want_b[rows[name]]
        if name in cols:
            want_w = want_w[:, cols[name]]
        torch.testing.assert_close(module.weight, want_w, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(module.bias, want_b, rtol=1e-12, atol=1e-12)
    # the optimizer holds exactly the model's parameters
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters()}
    assert all(id(p) in held for p in opt.state)


def test_state_dict_round_trip_into_a_model_of_the_new_sizes(tmp_path):
    model = _mlp()
    opt = torch.optim.Adam(model.parameters())
    simp = Simplifier(model, opt, prune=0.3)
    _train(model, opt)
    simp.step()
    dims = simp.dims()
    path = tmp_path / "simplified.pt"
    torch.save(model.state_dict(), path)
    fresh = _mlp(dims=(20, dims["0"], dims["3"], 5))
    fresh.load_state_dict(torch.load(path))
    x = torch.randn(4, 20, dtype=torch.double)
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_bad_arguments_change_nothing():
    model = _mlp()
    before = {n: p.clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters())
    for prune in (-0.1, 1.5, "0.1", True, math.nan):
        with pytest.raises(ValueError, match="prune must be a number in"):
            Simplifier(model, opt, prune=prune)
    with pytest.raises(ValueError, match="'nope' is not a module"):
        Simplifier(model, opt, pairs=[("0", "nope")])
    with pytest.raises(TypeError, match="producer '4' must be a MePropLinear"):
        Simplifier(model, opt, pairs=[("4", "0")])
    lbfgs = torch.optim.LBFGS(model.parameters())
    with pytest.raises(TypeError, match="cannot slice the state of LBFGS"):
        Simplifier(model, [opt, lbfgs])
    with pytest.raises(ValueError, match="min_units"):
        Simplifier(model, opt, min_units=0)
    simp = Simplifier(model, opt)
    with pytest.raises(TypeError, match="cannot slice the state of LBFGS"):
        simp.optimizers = lbfgs
    assert simp.optimizers == [opt]
    simp.optimizers = torch.optim.SGD(model.parameters(), lr=0.1)  # a rebuilt optimizer, taken
    assert isinstance(simp.optimizers[0], torch.optim.SGD)
    simp.close()
    assert not any(m.track_selection for m in model.modules() if isinstance(m, MePropLinear))
    dense = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="found no layer to simplify"):
        Simplifier(dense, [])
    with pytest.raises(ValueError, match="LayerNorm"):
        Simplifier(nn.Sequential(MePropLinear(3, 4, k=2), nn.LayerNorm(4), nn.Linear(4, 2)), [])
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_unsliceable_state_refused_before_any_change():
    """A state tensor of another shape (a hand-made optimizer state) is refused at step()
    and nothing changes."""
    model = _mlp()
    opt = torch.optim.Adam(model.parameters())
    simp = Simplifier(model, opt, prune=0.5)
    _train(model, opt)
    opt.state[model[0].weight]["odd"] = torch.zeros(3)
    sizes = simp.dims()
    params = [p for p in model.parameters()]
    with pytest.raises(RuntimeError, match="cannot slice it"):
        simp.step()
    assert simp.dims() == sizes and [p for p in model.parameters()] == params
    assert model[0].selection_stats().rows > 0  # counters not reset


def test_pairs_of_one_layer_or_a_producer_twice_are_refused_before_anything_changes():
    """A square layer named as its own consumer passed every check and step() cut its
    rows and its columns: the next forward failed, with the weights and Adam's state
    already cut."""
    model = _mlp(dims=(20, 30, 30, 5))
    opt = torch.optim.Adam(model.parameters())
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"producer '3' and consumer '3' are one layer"):
        Simplifier(model, opt, pairs=[("3", "3")])
    with pytest.raises(ValueError, match=r"producer '0' is in two pairs \('0' -> '3' and '0' -> '6'\)"):
        Simplifier(model, opt, pairs=[("0", "3"), ("0", "6")])
    assert not any(m.track_selection for m in model.modules() if isinstance(m, MePropLinear))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_numpy_numbers_are_taken_for_prune_and_min_units():
    simp = Simplifier(_mlp(), [], prune=np.float32(0.25), min_units=np.int64(3))
    assert simp.prune == 0.25 and simp.min_units == 3 and type(simp.min_units) is int
