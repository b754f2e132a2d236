"""``MePropLinear`` as a drop-in stand-in for ``nn.Linear``."""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meprop_triton import MePropLinear

BIAS = [pytest.param(True, id="bias"), pytest.param(False, id="nobias")]
SIZES = [pytest.param((1, 1), id="1x1"), pytest.param((7, 37), id="7x37"),
         pytest.param((123, 16), id="123x16")]


@pytest.mark.parametrize("bias", BIAS)
@pytest.mark.parametrize("size", SIZES)
def test_same_parameters_state_dict_and_init_as_linear(size, bias):
    in_f, out_f = size
    torch.manual_seed(1234)
    lin = nn.Linear(in_f, out_f, bias=bias)
    torch.manual_seed(1234)
    mp = MePropLinear(in_f, out_f, bias=bias, k=0.25)
    assert isinstance(mp, nn.Linear)
    assert (mp.in_features, mp.out_features) == (in_f, out_f)
    assert [(n, p.shape, p.dtype) for n, p in mp.named_parameters()] == [
        (n, p.shape, p.dtype) for n, p in lin.named_parameters()
    ]
    assert list(mp.state_dict()) == list(lin.state_dict()) == (["weight", "bias"] if bias else ["weight"])
    assert all(type(p) is nn.Parameter for p in mp.parameters())
    # Same init draws under the same seed: the same values, not just the same distribution.
    assert torch.equal(mp.weight, lin.weight)
    if bias:
        assert torch.equal(mp.bias, lin.bias)
    else:
        assert mp.bias is None
    # ... and the generator ends in the same state (no extra draws).
    torch.manual_seed(1234)
    nn.Linear(in_f, out_f, bias=bias)
    after_lin = torch.rand(3)
    torch.manual_seed(1234)
    MePropLinear(in_f, out_f, bias=bias, k=1)
    assert torch.equal(torch.rand(3), after_lin)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_device_and_dtype_arguments(dtype):
    mp = MePropLinear(4, 3, k=1, dtype=dtype, device="cpu")
    assert mp.weight.dtype == dtype and mp.bias.dtype == dtype
    assert mp.weight.device.type == "cpu"
    meta = MePropLinear(4, 3, k=1, device="meta")
    assert meta.weight.is_meta


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        (dict(k=2), "in_features=4, out_features=3, bias=True, k=2"),
        (dict(k=0.25, bias=False), "in_features=4, out_features=3, bias=False, k=0.25"),
        (dict(k=5, backend="torch"), "in_features=4, out_features=3, bias=True, k=5, backend='torch'"),
    ],
    ids=["k=2", "k=0.25-nobias", "backend"],
)
def test_extra_repr_shows_k(kwargs, expected):
    mp = MePropLinear(4, 3, **kwargs)
    assert mp.extra_repr() == expected
    assert mp.extra_repr().startswith(nn.Linear(4, 3, bias=kwargs.get("bias", True)).extra_repr())
    assert f"MePropLinear({expected})" == repr(mp)


@pytest.mark.parametrize(
    "k,out_f,expected",
    [(1, 10, 1), (3, 10, 3), (10, 10, 10), (99, 10, 10), (0.1, 37, 4), (0.25, 123, 31),
     (1.0, 7, 7), (0.07, 100, 7), (1e-6, 50, 1)],
    ids=lambda v: repr(v),
)
def test_k_units(k, out_f, expected):
    mp = MePropLinear(5, out_f, k=k)
    assert mp.k == k
    assert mp.k_units == expected


def test_k_units_follows_k():
    mp = MePropLinear(5, 40, k=4)
    mp.k = 0.5
    assert mp.k_units == 20


@pytest.mark.parametrize("bias", BIAS)
def test_from_linear_shares_parameters_and_optimizer_keeps_working(bias):
    torch.manual_seed(0)
    lin = nn.Linear(6, 9, bias=bias)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    mp = MePropLinear.from_linear(lin, k=3)
    assert type(mp) is MePropLinear and mp.k == 3
    assert mp.weight is lin.weight
    assert (mp.bias is lin.bias) if bias else mp.bias is None
    assert list(mp.state_dict()) == list(lin.state_dict())
    before = mp.weight.detach().clone()
    mp(torch.randn(5, 6)).pow(2).sum().backward()
    assert int((mp.weight.grad != 0).any(1).sum()) == 3  # meProp ran
    opt.step()
    changed = (mp.weight.detach() != before).any(1)
    assert int(changed.sum()) == 3, "the optimizer built before the swap updates the new module"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_from_linear_keeps_dtype_device_training(dtype, training):
    lin = nn.Linear(4, 3, dtype=dtype).train(training)
    mp = MePropLinear.from_linear(lin, k=1, backend="torch")
    assert mp.weight.dtype == dtype and mp.weight.device == lin.weight.device
    assert mp.training is training
    assert mp.backend == "torch"


def test_from_linear_on_meta_device():
    lin = nn.Linear(4, 3, device="meta")
    mp = MePropLinear.from_linear(lin, k=1)
    assert mp.weight is lin.weight and mp.weight.is_meta


@pytest.mark.parametrize("bias", BIAS)
def test_load_state_dict_from_linear_reproduces_outputs(bias):
    torch.manual_seed(3)
    lin = nn.Linear(11, 13, bias=bias)
    torch.manual_seed(99)  # a different init, overwritten by the load
    mp = MePropLinear(11, 13, bias=bias, k=4)
    assert not torch.equal(mp.weight, lin.weight)
    mp.load_state_dict(lin.state_dict())
    for shape in [(11,), (5, 11), (2, 3, 11)]:
        x = torch.randn(shape)
        assert torch.equal(mp(x), lin(x))
    # ... and back again.
    lin2 = nn.Linear(11, 13, bias=bias)
    lin2.load_state_dict(mp.state_dict())
    x = torch.randn(4, 11)
    assert torch.equal(lin2(x), mp(x))


def test_forward_equals_linear_and_backward_is_sparse():
    torch.manual_seed(5)
    lin = nn.Linear(8, 20)
    mp = copy.deepcopy(lin)
    mp = MePropLinear.from_linear(mp, k=0.25)
    x = torch.randn(6, 8, requires_grad=True)
    y = mp(x)
    assert torch.equal(y, lin(x))
    y.sum().backward()
    assert int((mp.weight.grad != 0).any(1).sum()) == 5
    assert int((mp.bias.grad != 0).sum()) == 20


def test_works_under_no_grad():
    torch.manual_seed(0)
    mp = MePropLinear(8, 5, k=2)
    x = torch.randn(3, 8)
    with torch.no_grad():
        y = mp(x)
    assert y.grad_fn is None and not y.requires_grad
    assert torch.equal(y, F.linear(x, mp.weight, mp.bias).detach())


def test_works_under_inference_mode():
    mp = MePropLinear(8, 5, k=2)
    x = torch.randn(3, 8)
    with torch.inference_mode():
        y = mp(x)
        assert torch.equal(y, F.linear(x, mp.weight, mp.bias))


@pytest.mark.parametrize("k", [3, 12], ids=["k=3", "k=out"])
def test_autocast_bf16_gradients_reach_fp32_params(k):
    torch.manual_seed(7)
    lin = nn.Linear(16, 12)
    mp = MePropLinear.from_linear(copy.deepcopy(lin), k=k)
    x = torch.randn(2, 5, 16)
    target = torch.randn(2, 5, 12)
    outs = []
    for module in (lin, mp):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = module(x)
        assert y.dtype == torch.bfloat16
        outs.append(y)
        ((y.float() - target) ** 2).sum().backward()
    assert torch.equal(outs[0], outs[1]), "the forward under autocast is nn.Linear's"
    assert mp.weight.dtype == mp.weight.grad.dtype == torch.float32
    assert mp.bias.grad.dtype == torch.float32
    rows = (mp.weight.grad != 0).any(1)
    assert int(rows.sum()) == k
    # The selected rows and the (dense) bias gradient match nn.Linear's, up to bf16 rounding.
    torch.testing.assert_close(mp.weight.grad[rows], lin.weight.grad[rows], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(mp.bias.grad, lin.bias.grad, rtol=2e-2, atol=2e-2)


def test_autocast_leaves_float64_alone_like_linear():
    lin = nn.Linear(4, 3, dtype=torch.float64)
    mp = MePropLinear.from_linear(lin, k=1)
    x = torch.randn(2, 4, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(x).dtype == torch.float64
        assert mp(x).dtype == torch.float64


def test_from_linear_keeps_hooks_and_their_handles():
    lin = nn.Linear(5, 4)
    calls = []
    handle = lin.register_forward_hook(lambda mod, inp, out: out * 2)
    lin.register_forward_pre_hook(lambda mod, inp: calls.append(1))
    x = torch.randn(3, 5)
    expected = lin(x)
    mp = MePropLinear.from_linear(lin, k=2)
    torch.testing.assert_close(mp(x), expected, rtol=0, atol=0)
    assert len(calls) == 2
    handle.remove()  # a handle taken before the swap removes the hook from the new layer
    torch.testing.assert_close(mp(x), expected / 2, rtol=0, atol=0)


def test_from_linear_refuses_a_pruned_layer_with_the_fix():
    from torch.nn.utils import prune

    lin = nn.Linear(6, 4)
    prune.l1_unstructured(lin, "weight", amount=0.5)
    with pytest.raises(TypeError, match=r"prune\.remove"):
        MePropLinear.from_linear(lin, k=2)
    prune.remove(lin, "weight")
    assert isinstance(MePropLinear.from_linear(lin, k=2), MePropLinear)


def test_layer_pickled_with_public_setting_names_loads():
    """A layer whose __dict__ holds the settings under their public names (as pickled
    before they became checked properties) loads and trains."""
    import copy

    layer = MePropLinear(6, 5, k=2, unified=False)
    state = layer.__dict__.copy()
    for name in ("k", "unified", "selection", "sparse_grad", "backend"):
        state[name] = state.pop("_" + name)
    state.pop("_k_for")
    old = MePropLinear.__new__(MePropLinear)
    old.__setstate__(copy.copy(state))
    assert old.k == 2 and old.unified is False and old.backend == "auto"
    old(torch.randn(3, 6)).sum().backward()
    assert int((old.weight.grad != 0).any(1).sum()) <= 5


def test_autocast_with_low_precision_input_and_fp32_layer():
    """Under autocast the input often arrives in the autocast dtype from an earlier layer
    while this layer's parameters stay fp32: the layer runs in the autocast dtype and its
    weight gradient is fp32, k rows."""
    layer = MePropLinear(8, 4, k=2)
    x = torch.randn(3, 8, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32
    assert int((layer.weight.grad != 0).any(1).sum()) == 2


@pytest.mark.filterwarnings("ignore:Using a non-full backward hook:FutureWarning")
@pytest.mark.parametrize("kind", ["full", "legacy"])
def test_backward_hooks_registered_before_the_swap_keep_running(kind):
    """torch runs a module's backward hooks only when its per-instance flag says which
    kind it holds; the swapped-in layer shares the hook registry, so it needs the flag."""
    from meprop_triton import MePropLSTM, convert

    calls = []
    model = nn.ModuleDict({"lin": nn.Linear(5, 4), "rnn": nn.LSTM(5, 4)})
    for name, layer in model.items():
        hook = (lambda n: lambda mod, gin, gout: calls.append(n))(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # register_backward_hook is deprecated
            (layer.register_full_backward_hook if kind == "full" else layer.register_backward_hook)(hook)
    convert(model, k=2, lstm=True)
    assert type(model["lin"]) is MePropLinear and type(model["rnn"]) is MePropLSTM
    x = torch.randn(3, 5, requires_grad=True)
    model["lin"](x).sum().backward()
    assert calls == ["lin"]
    if kind == "full":  # nn.Module refuses a legacy hook on a module with several outputs
        model["rnn"](x.unsqueeze(1))[0].sum().backward()
        assert calls == ["lin", "rnn"]


@pytest.mark.parametrize("layer_kind", ["linear", "conv1d"])
@pytest.mark.parametrize("opts", [{}, {"unified": False}, {"selection": "random"}, {"k": 50}],
                         ids=["unified", "per-example", "random", "dense-k"])
def test_a_frozen_layer_does_not_keep_its_input(opts, layer_kind):
    """As nn.Linear: with the weight frozen the input is not kept (an activation held until
    the backward for nothing, and an in-place change of it an error there), only its shape;
    saved-tensor hooks (save_on_cpu, activation offloading) then see only the weight. The
    gradients are those of the layer with everything trainable."""
    from meprop_triton import MePropConv1D

    torch.manual_seed(0)
    kw = {"k": 2, **opts}
    layer = MePropLinear(5, 7, **kw) if layer_kind == "linear" else MePropConv1D(7, 5, **kw)
    x, g = torch.randn(2, 3, 5), torch.randn(2, 3, 7)

    def run(x_grad: bool, w_grad: bool, change_input=False, offload=False):
        layer.zero_grad(set_to_none=True)
        layer.weight.requires_grad_(w_grad)
        xx = x.clone().requires_grad_(x_grad)
        inp = xx * 1 if x_grad else xx  # a non-leaf, so it may be changed in place
        torch.manual_seed(5)
        with torch.autograd.graph.save_on_cpu() if offload else contextlib.nullcontext():
            out = layer(inp)
        node = out.grad_fn
        while "Function" not in type(node).__name__:  # Conv1D's output is a view of it
            node = node.next_functions[0][0]
        saved = node.saved_tensors
        if change_input:
            inp.mul_(2)
        out.backward(g)
        return xx.grad, layer.weight.grad, layer.bias.grad, saved

    gx, gw, gb, saved = run(True, True)
    assert all(t is not None for t in saved)
    for offload in (False, True):
        fx, fw, fb, saved = run(True, False, change_input=True, offload=offload)
        assert saved[0] is None and saved[1] is layer.weight and fw is None
        assert torch.equal(fx, gx) and torch.equal(fb, gb)
    nx, nw, nb, saved = run(False, True, offload=True)
    assert nx is None and torch.equal(nw, gw) and torch.equal(nb, gb)