"""``MePropConv1D``: meProp for transformers' ``Conv1D`` layout (weight stored (in, out)),
without transformers: a stand-in class named ``Conv1D`` with the same layout."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from meprop_triton import MePropConv1D, MePropLinear, convert, meprop_linear
from meprop_triton.conv1d import is_conv1d, meprop_conv1d


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D, as written there (weight (nx, nf), bias (nf,))."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.nx = nx
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


def conv(nf=12, nx=9, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    layer = Conv1D(nf, nx).to(dtype)
    with torch.no_grad():  # weights of order 1, so the products are not tiny
        layer.weight.normal_()
        layer.bias.normal_()
    return layer


def grads(layer, x, g):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(g)
    bias = None if layer.bias is None else layer.bias.grad
    return y, x.grad, layer.weight.grad, bias


def test_duck_typing():
    assert is_conv1d(Conv1D(4, 3))
    assert not is_conv1d(nn.Linear(3, 4))

    class Conv1DLike(Conv1D):  # another class name: not recognised
        pass

    assert not is_conv1d(Conv1DLike(4, 3))
    wrong = Conv1D(4, 3)
    wrong.weight = nn.Parameter(torch.randn(4, 3))  # (out, in): not transformers' layout
    assert not is_conv1d(wrong)
    no_nf = Conv1D(4, 3)
    del no_nf.nf
    assert not is_conv1d(no_nf)


def test_same_parameters_state_dict_and_init_as_conv1d():
    torch.manual_seed(0)
    plain = Conv1D(20, 30)
    torch.manual_seed(0)
    mine = MePropConv1D(20, 30, k=4)
    assert [(n, p.shape) for n, p in mine.named_parameters()] == [(n, p.shape) for n, p in plain.named_parameters()]
    assert mine.weight.shape == (30, 20) and mine.bias.shape == (20,)
    assert torch.equal(mine.weight, plain.weight) and torch.equal(mine.bias, plain.bias)
    assert list(mine.state_dict()) == list(plain.state_dict()) == ["weight", "bias"]
    plain.load_state_dict(mine.state_dict(), strict=True)
    mine.load_state_dict(plain.state_dict(), strict=True)
    assert MePropConv1D(5, 3, k=1, bias=False).bias is None


def test_from_conv1d_shares_parameters_and_forward_is_bitwise_equal():
    layer = conv()
    mine = MePropConv1D.from_conv1d(layer, k=3)
    assert mine.weight is layer.weight and mine.bias is layer.bias
    assert (mine.nf, mine.nx) == (12, 9)
    for shape in [(9,), (5, 9), (2, 3, 9)]:
        x = torch.randn(*shape)
        assert torch.equal(mine(x), layer(x))
        with torch.no_grad():
            assert torch.equal(mine(x), layer(x))
    # An optimizer built over the old layer keeps working.
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = layer.weight.detach().clone()
    mine(torch.randn(4, 9)).sum().backward()
    opt.step()
    assert not torch.equal(layer.weight, before)


@pytest.mark.parametrize("lead", [(), (7,), (2, 5)], ids=["1d", "M7", "B2T5"])
@pytest.mark.parametrize("k", [1, 4, 0.3], ids=["k1", "k4", "k0.3"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_unified_gradients_equal_the_definition(lead, k, dtype, oracle, gen):
    """Against the independent oracle on the transposed weight (the linear layout)."""
    layer = conv(nf=13, nx=9, dtype=dtype)
    mine = MePropConv1D.from_conv1d(layer, k=k, backend="torch")
    x = torch.randn(*lead, 9, generator=gen, dtype=torch.float64).to(dtype)
    g = oracle.grad_output(lead or (1,), 13, dtype=dtype, generator=gen).reshape(*lead, 13)
    y, gx, gw, gb = grads(mine, x, g)
    ref = oracle.grads(x, layer.weight.t(), g, oracle.k_units(k, 13))
    oracle.assert_within_bound(gx, ref["grad_x"], ref["bound_x"], 13, what="grad_x")
    # The weight gradient in the stored (in, out) layout: the oracle's transposed.
    oracle.assert_within_bound(gw, ref["grad_w"].T, ref["bound_w"].T, max(1, x.numel() // 9), what="grad_W")
    oracle.assert_within_bound(gb, ref["grad_b"], ref["bound_b"], max(1, x.numel() // 9), what="grad_b")
    kept = (gw != 0).any(0).nonzero().flatten().numpy()
    assert list(kept) == list(ref["selected"])


@pytest.mark.parametrize("unified", [True, False], ids=["unified", "per-example"])
@pytest.mark.parametrize("selection", ["topk", "random"])
@pytest.mark.parametrize("k", [3, 0.5, 40], ids=["k3", "k0.5", "k-dense"])
def test_every_mode_equals_meprop_linear_on_the_transposed_weight(unified, selection, k, gen):
    """The same selection and gradients as MePropLinear's path given W = weight.t()."""
    layer = conv(nf=16, nx=11, dtype=torch.float64)
    mine = MePropConv1D.from_conv1d(layer, k=k, unified=unified, selection=selection, backend="torch")
    x = torch.randn(6, 11, generator=gen, dtype=torch.float64)
    g = torch.randn(6, 16, generator=gen, dtype=torch.float64)
    torch.manual_seed(5)  # the random selections draw from torch's default generator
    _, gx, gw, gb = grads(mine, x, g)
    w = layer.weight.detach().t().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    xl = x.clone().requires_grad_()
    torch.manual_seed(5)
    meprop_linear(xl, w, b, k=k, unified=unified, selection=selection, backend="torch").backward(g)
    torch.testing.assert_close(gx, xl.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, w.grad.t(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb, b.grad, rtol=0, atol=0)


def test_dense_k_equals_conv1d_gradients(gen):
    layer = conv(nf=10, nx=7, dtype=torch.float64)
    x = torch.randn(3, 4, 7, generator=gen, dtype=torch.float64)
    g = torch.randn(3, 4, 10, generator=gen, dtype=torch.float64)
    _, gx0, gw0, gb0 = grads(layer, x, g)
    _, gx, gw, gb = grads(MePropConv1D.from_conv1d(layer, k=10), x, g)
    for a, b in ((gx, gx0), (gw, gw0), (gb, gb0)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_unified_weight_gradient_is_made_in_the_stored_layout(gen):
    """The torch path hands autograd an (in, out) contiguous gradient: no transposed copy."""
    layer = conv(nf=32, nx=24)
    mine = MePropConv1D.from_conv1d(layer, k=4, backend="torch")
    seen = []
    layer.weight.register_hook(lambda grad: seen.append((grad.shape, grad.is_contiguous())))
    mine(torch.randn(5, 24, generator=gen)).sum().backward()
    assert seen == [((24, 32), True)]
    assert int((layer.weight.grad != 0).any(0).sum()) == 4
    assert int((layer.weight.grad != 0).any(1).sum()) == 24  # whole columns


def test_bias_none_and_only_some_gradients(gen):
    mine = MePropConv1D(8, 5, k=2, bias=False)
    x = torch.randn(3, 5, generator=gen)
    mine(x).sum().backward()  # weight only
    assert int((mine.weight.grad != 0).any(0).sum()) == 2
    mine.weight.requires_grad_(False)
    x.requires_grad_()
    mine(x).pow(2).sum().backward()  # input only
    assert x.grad is not None and mine.weight.grad is not None


def test_sparse_grad_is_refused_clearly():
    with pytest.raises(ValueError, match=r"sparse_grad=True is not supported for Conv1D.*columns"):
        MePropConv1D(4, 3, k=1, sparse_grad=True)
    with pytest.raises(ValueError, match=r"sparse_grad=True is not supported for Conv1D"):
        MePropConv1D.from_conv1d(conv(), k=1, sparse_grad=True)
    mine = MePropConv1D(4, 3, k=1)
    with pytest.raises(ValueError, match=r"sparse_grad=True is not supported for Conv1D"):
        mine.sparse_grad = True
    mine.sparse_grad = False
    assert mine.sparse_grad is False
    with pytest.raises(TypeError, match="sparse_grad must be True or False"):
        mine.sparse_grad = "yes"


def test_settings_are_checked_when_set():
    mine = MePropConv1D(10, 4, k=3)
    with pytest.raises(ValueError, match=r"k must be an int >= 1.*got 0"):
        mine.k = 0
    with pytest.raises(ValueError, match=r"\(0, 1\].*1.5"):
        mine.k = 1.5
    with pytest.raises(ValueError, match="selection must be one of"):
        mine.selection = "best"
    with pytest.raises(ValueError, match="backend must be one of"):
        mine.backend = "cuda"
    with pytest.raises(TypeError, match="unified must be True or False"):
        mine.unified = 1
    assert (mine.k, mine.selection, mine.backend, mine.unified) == (3, "topk", "auto", True)
    mine.k = 0.25
    assert mine.k_units == 3
    with pytest.raises(ValueError, match="nf must be an int >= 1; got 0"):
        MePropConv1D(0, 4, k=1)
    with pytest.raises(TypeError, match=r"from_conv1d expects a transformers Conv1D.*Linear"):
        MePropConv1D.from_conv1d(nn.Linear(3, 4), k=1)
    with pytest.raises(TypeError, match="unexpected option"):
        MePropConv1D.from_conv1d(conv(), k=1, sparse=True)


def test_bad_input_is_named_before_any_work():
    mine = MePropConv1D.from_conv1d(conv(nf=12, nx=9), k=2)
    with pytest.raises(ValueError, match=r"input width 9.*\(9, 12\).*\(4, 8\)"):
        mine(torch.randn(4, 8))
    with pytest.raises(TypeError, match=r"share one dtype.*float64"):
        mine(torch.randn(4, 9, dtype=torch.float64))
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        mine([1.0] * 9)
    assert mine.weight.grad is None


def test_track_selection_counts_like_meprop_linear(gen):
    layer = conv(nf=10, nx=6)
    mine = MePropConv1D.from_conv1d(layer, k=3, track_selection=True)
    lin = MePropLinear(6, 10, k=3, track_selection=True)
    with torch.no_grad():
        lin.weight.copy_(layer.weight.t())
        lin.bias.copy_(layer.bias)
    for _ in range(3):
        x = torch.randn(4, 6, generator=gen)
        g = torch.randn(4, 10, generator=gen)
        mine(x).backward(g)
        lin(x).backward(g)
    assert torch.equal(mine.selection_counts, lin.selection_counts)
    assert int(mine.selection_counts[-1]) == 12
    assert "selection_counts" not in mine.state_dict()
    mine.track_selection = False
    assert "selection_counts" not in dict(mine.named_buffers())


@pytest.mark.parametrize("unified", [True, False])
def test_selection_stats_equal_meprop_linear_on_the_transposed_weight(unified, gen):
    layer = conv(nf=10, nx=6)
    mine = MePropConv1D.from_conv1d(layer, k=3, unified=unified, track_selection=True)
    lin = MePropLinear(6, 10, k=3, unified=unified, track_selection=True)
    with torch.no_grad():
        lin.weight.copy_(layer.weight.t())
        lin.bias.copy_(layer.bias)
    for layer_ in (mine, lin):  # nothing seen yet: zero hits and rate
        stats = layer_.selection_stats()
        assert stats.rows == 0 and not stats.hits.any() and not stats.hit_rate.any()
    x = torch.randn(5, 6, generator=gen)
    g = torch.randn(5, 10, generator=gen)
    mine(x).backward(g)
    lin(x).backward(g)
    ours, theirs = mine.selection_stats(), lin.selection_stats()
    assert ours.rows == theirs.rows == 5
    assert torch.equal(ours.hits, theirs.hits) and ours.hits.dtype == torch.int64
    assert torch.equal(ours.hit_rate, theirs.hit_rate) and ours.hit_rate.dtype == torch.float64
    assert int(ours.hits.sum()) == 5 * 3
    ours.hits.zero_()  # a copy: the counters are untouched
    assert int(mine.selection_counts[:-1].sum()) == 15
    mine.reset_selection_stats()
    assert not mine.selection_counts.any() and mine.selection_stats().rows == 0
    # fresh random input after the reset: counted again, as the linear layer counts it
    lin.reset_selection_stats()
    x = torch.randn(7, 6, generator=gen)
    g = torch.randn(7, 10, generator=gen)
    mine(x).backward(g)
    lin(x).backward(g)
    assert torch.equal(mine.selection_stats().hits, lin.selection_stats().hits)
    assert mine.selection_stats().rows == 7


def test_selection_stats_refused_without_track_selection():
    mine = MePropConv1D(10, 4, k=3)
    assert not mine.track_selection and "selection_counts" not in dict(mine.named_buffers())
    with pytest.raises(RuntimeError, match=r"keeps no selection statistics; set layer.track_selection = True"):
        mine.selection_stats()
    with pytest.raises(RuntimeError, match=r"keeps no selection statistics \(track_selection is False\)"):
        mine.reset_selection_stats()
    mine.track_selection = True
    assert mine.selection_counts.shape == (11,) and mine.selection_counts.dtype == torch.int64
    assert mine.selection_stats().rows == 0
    mine.track_selection = False
    with pytest.raises(RuntimeError, match="keeps no selection statistics"):
        mine.selection_stats()


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16], ids=["fp32-input", "bf16-input"])
def test_autocast_bf16_on_cpu(gen, input_dtype):
    """fp32 weights under autocast, the input fp32 (after a LayerNorm) or already bf16
    (GPT-2's c_proj gets the attention's bf16 output): both as Conv1D runs them."""
    layer = conv(nf=16, nx=8)
    mine = MePropConv1D.from_conv1d(layer, k=4)
    x = torch.randn(5, 8, generator=gen).to(input_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mine(x)
        with torch.no_grad():
            y0 = layer(x)
    assert y.dtype == torch.bfloat16 == y0.dtype
    torch.testing.assert_close(y, y0)
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32
    assert int((layer.weight.grad != 0).any(0).sum()) == 4


def test_functional_form_and_generator(gen):
    w = torch.randn(7, 9, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 7, dtype=torch.float64)
    meprop_conv1d(x, w, None, k=2, selection="random", generator=torch.Generator().manual_seed(3)).sum().backward()
    first = w.grad.clone()
    w.grad = None
    meprop_conv1d(x, w, None, k=2, selection="random", generator=torch.Generator().manual_seed(3)).sum().backward()
    assert torch.equal(first, w.grad)
    assert int((first != 0).any(0).sum()) == 2
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        meprop_conv1d(x, w, k=2, generator=3)


def test_pickle_deepcopy_and_repr():
    mine = MePropConv1D.from_conv1d(conv(), k=0.25, unified=False, backend="torch")
    assert repr(mine) == "MePropConv1D(nf=12, nx=9, k=0.25, unified=False, backend='torch')"
    for other in (copy.deepcopy(mine), pickle.loads(pickle.dumps(mine))):
        assert (other.k, other.unified, other.backend) == (0.25, False, "torch")
        assert torch.equal(other.weight, mine.weight)


def test_convert_swaps_conv1d_and_names_it():
    model = nn.Sequential(conv(8, 6), nn.ReLU(), conv(4, 8, seed=1))
    params = list(model.parameters())
    out, report = convert(model, k=0.5, report=True)
    assert out is model
    assert [type(m) for m in model] == [MePropConv1D, nn.ReLU, MePropConv1D]
    assert all(p is q for p, q in zip(params, model.parameters()))
    assert report.converted == {"0": "Conv1D", "2": "Conv1D"}
    assert report.left_dense == {}
    assert model[0].k_units == 4 and model[2].k_units == 2
    model(torch.randn(3, 6)).sum().backward()
    assert int((model[0].weight.grad != 0).any(0).sum()) == 4


def test_convert_refuses_sparse_grad_with_conv1d_and_changes_nothing():
    model = nn.Sequential(conv(8, 6), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"sparse_grad=True is not supported for Conv1D.*\(0\).*exclude"):
        convert(model, k=2, sparse_grad=True)
    assert type(model[0]) is Conv1D and type(model[1]) is nn.Linear
    convert(model, k=2, sparse_grad=True, exclude=["0"])  # the way out the message names
    assert type(model[0]) is Conv1D and type(model[1]) is MePropLinear


def test_convert_changes_settings_of_a_converted_conv1d():
    model = nn.Sequential(conv(8, 6))
    convert(model, k=2)
    first = model[0]
    convert(model, k=0.5, unified=False)
    assert model[0] is not first and model[0].weight is first.weight
    assert (model[0].k, model[0].unified) == (0.5, False)


def test_k_set_between_calls_takes_effect(gen):
    layer = MePropConv1D.from_conv1d(conv(nf=20, nx=6), k=2)
    x = torch.randn(4, 6, generator=gen)
    layer(x).sum().backward()
    assert int((layer.weight.grad != 0).any(0).sum()) == 2
    layer.zero_grad(set_to_none=True)
    layer.k = 0.25
    layer(x).sum().backward()
    assert int((layer.weight.grad != 0).any(0).sum()) == 5
    # a replaced weight of another width: k resolved for it
    layer.weight = nn.Parameter(torch.randn(6, 40))
    layer.bias = nn.Parameter(torch.zeros(40))
    layer(x).sum().backward()
    assert int((layer.weight.grad != 0).any(0).sum()) == 10


def test_no_grad_and_inference_mode_forward(gen):
    layer = conv()
    mine = MePropConv1D.from_conv1d(layer, k=2)
    x = torch.randn(3, 9, generator=gen)
    with torch.inference_mode():
        assert torch.equal(mine(x), layer(x))
    with torch.no_grad():
        assert not mine(x).requires_grad


@pytest.mark.parametrize("unified", [True, False], ids=["unified", "per-example"])
def test_vmap_grad_gives_per_sample_gradients(unified, gen):
    """torch.func: vmap(grad(...)) over a MePropConv1D; each sample is its own call, so
    its gradient is that sample's own meProp gradient (computed here one sample at a time
    through the eager layer)."""
    from torch.func import functional_call, grad, vmap

    layer = MePropConv1D.from_conv1d(conv(nf=15, nx=7, dtype=torch.float64), k=4, unified=unified)
    params = {n: p.detach() for n, p in layer.named_parameters()}
    x = torch.randn(5, 3, 7, generator=gen, dtype=torch.float64)  # 5 samples of 3 tokens
    target = torch.randn(5, 3, 15, generator=gen, dtype=torch.float64)

    def loss(p, xs, ts):
        return (functional_call(layer, p, (xs,)) - ts).pow(2).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target)
    for i in range(5):
        layer.zero_grad(set_to_none=True)
        loss(dict(layer.named_parameters()), x[i], target[i]).backward()
        torch.testing.assert_close(per_sample["weight"][i], layer.weight.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(per_sample["bias"][i], layer.bias.grad, rtol=1e-12, atol=1e-12)
        assert int((per_sample["weight"][i] != 0).any(0).sum()) <= (4 if unified else 12)
    assert int((per_sample["weight"][0] != 0).any(0).sum()) >= 4


def test_torch_func_grad_equals_eager_backward(gen):
    from torch.func import functional_call, grad

    layer = MePropConv1D.from_conv1d(conv(nf=15, nx=7, dtype=torch.float64), k=3)
    x = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    params = {n: p.detach() for n, p in layer.named_parameters()}
    got = grad(lambda p: functional_call(layer, p, (x,)).pow(2).sum())(params)
    layer(x).pow(2).sum().backward()
    torch.testing.assert_close(got["weight"], layer.weight.grad, rtol=1e-12, atol=1e-12)
    assert int((got["weight"] != 0).any(0).sum()) == 3


def test_bare_conv1d_converts_and_its_settings_apply_back():
    from meprop_triton import apply_settings, meprop_settings

    layer = conv()
    out, report = convert(layer, k=3, report=True)
    assert type(out) is MePropConv1D and out.weight is layer.weight and type(layer) is Conv1D
    assert report.converted == {"": "Conv1D"}
    settings = meprop_settings(out)
    assert settings == {"": {"type": "MePropConv1D", "k": 3, "unified": True, "selection": "topk",
                             "sparse_grad": False, "backend": "auto", "track_selection": False}}
    again = apply_settings(conv(seed=1), settings)
    assert type(again) is MePropConv1D and again.k == 3
