"""Bad arguments are refused at the public API with a message that names the bad value
and what was expected, and a refused call changes nothing."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from meprop_triton import MePropLinear, convert, meprop_linear

BAD_K = [
    (0, ValueError), (0.0, ValueError), (-1, ValueError), (-0.5, ValueError),
    (math.nan, ValueError), (math.inf, ValueError), (-math.inf, ValueError),
    (True, TypeError), (False, TypeError), ("3", TypeError), (None, TypeError),
    (1.5, ValueError), (2.0, ValueError), (torch.tensor(3), TypeError), ([2], TypeError),
]


def _k_id(case):
    k, _ = case
    return f"k={k!r}" if not isinstance(k, torch.Tensor) else "k=tensor(3)"


def k_message(k) -> str:
    """The message must quote the bad k and say what a k must be."""
    shown = "tensor" if isinstance(k, torch.Tensor) else re.escape(repr(k))
    return rf"(?s)^(?=.*\bk\b)(?=.*{shown})(?=.*(int >= 1|\(0, 1\]))"


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def snapshot(module: nn.Module):
    """Everything a refused call must leave as it was."""
    return {
        "modules": [(n, type(m), getattr(m, "k", None)) for n, m in module.named_modules()],
        "params": [(n, p, p.detach().clone(), p.grad, None if p.grad is None else p.grad.clone())
                   for n, p in module.named_parameters()],
    }


def assert_unchanged(module: nn.Module, before):
    after = snapshot(module)
    assert after["modules"] == before["modules"]
    assert len(after["params"]) == len(before["params"])
    for (n1, p1, v1, g1, gv1), (n2, p2, v2, g2, gv2) in zip(before["params"], after["params"]):
        assert n1 == n2 and p1 is p2, f"parameter {n1} was replaced"
        assert torch.equal(v1, v2), f"parameter {n1} changed"
        assert g1 is g2, f"{n1}.grad was replaced"
        if g1 is not None:
            assert torch.equal(gv1, gv2), f"{n1}.grad changed"


@pytest.fixture
def trained_layer():
    """A MePropLinear(5, 3) whose parameters already hold gradients."""
    torch.manual_seed(1)
    layer = MePropLinear(5, 3, k=2)
    layer(torch.randn(4, 5)).sum().backward()
    assert layer.weight.grad is not None
    return layer


# ---------------------------------------------------------------------------- k


@pytest.mark.parametrize("case", BAD_K, ids=_k_id)
def test_bad_k_meprop_linear(case):
    k, exc = case
    x, w = torch.randn(2, 4), torch.randn(3, 4, requires_grad=True)
    with pytest.raises(exc, match=k_message(k)):
        meprop_linear(x, w, k=k)
    assert w.grad is None


@pytest.mark.parametrize("case", BAD_K, ids=_k_id)
def test_bad_k_module(case):
    k, exc = case
    with pytest.raises(exc, match=k_message(k)):
        MePropLinear(4, 3, k=k)


@pytest.mark.parametrize("case", BAD_K, ids=_k_id)
def test_bad_k_from_linear(case):
    k, exc = case
    lin = nn.Linear(4, 3)
    with pytest.raises(exc, match=k_message(k)):
        MePropLinear.from_linear(lin, k=k)


@pytest.mark.parametrize("case", BAD_K, ids=_k_id)
def test_bad_k_convert_changes_nothing(case):
    k, exc = case
    model = small_model()
    before = snapshot(model)
    with pytest.raises(exc, match=k_message(k)):
        convert(model, k=k)
    assert_unchanged(model, before)


@pytest.mark.parametrize("case", [(0, ValueError), (1.5, ValueError), ("2", TypeError)], ids=_k_id)
def test_bad_k_set_on_module_is_refused_at_assignment(case, trained_layer):
    k, exc = case
    before = snapshot(trained_layer)
    old_k = trained_layer.k
    with pytest.raises(exc, match=k_message(k)):
        trained_layer.k = k
    assert trained_layer.k == old_k
    assert_unchanged(trained_layer, before)
    trained_layer(torch.randn(2, 5)).sum().backward()  # still works with the old k


@pytest.mark.parametrize(
    "name,value,exc,match",
    [
        ("unified", 1, TypeError, r"unified must be True or False; got 1"),
        ("sparse_grad", "yes", TypeError, r"sparse_grad must be True or False; got 'yes'"),
        ("selection", "top", ValueError, r"selection must be one of 'topk', 'random'; got 'top'"),
        ("backend", "cuda", ValueError, r"backend must be one of 'auto', 'torch', 'triton'; got 'cuda'"),
    ],
)
def test_bad_setting_on_module_is_refused_at_assignment(name, value, exc, match, trained_layer):
    before = snapshot(trained_layer)
    old = getattr(trained_layer, name)
    with pytest.raises(exc, match=match):
        setattr(trained_layer, name, value)
    assert getattr(trained_layer, name) == old
    assert_unchanged(trained_layer, before)


def test_weight_of_wrong_shape_is_blamed_on_the_weight():
    layer = MePropLinear(8, 16, k=4)
    layer.weight = torch.nn.Parameter(torch.randn(16, 7))
    with pytest.raises(ValueError, match=r"weight has shape \(16, 7\).*in_features=8.*\(16, 8\)"):
        layer(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"in_features=7, the width of weight \(16, 7\); got input of shape \(2, 8\)"):
        meprop_linear(torch.randn(2, 8), torch.randn(16, 7), k=4)


# ---------------------------------------------------------------- tensor args

def _shape_and_dtype_cases():
    f32, f64 = torch.float32, torch.float64
    return [
        pytest.param(
            dict(x=torch.randn(3, 4), w=torch.randn(2, 5)),
            ValueError, r"in_features=5.*\(3, 4\)", id="in_features-mismatch"),
        pytest.param(
            dict(x=torch.randn(2, 3, 4), w=torch.randn(2, 6)),
            ValueError, r"in_features=6.*\(2, 3, 4\)", id="in_features-mismatch-3d"),
        pytest.param(
            dict(x=torch.randn(4), w=torch.randn(2, 5)),
            ValueError, r"in_features=5.*\(4,\)", id="in_features-mismatch-1d"),
        pytest.param(
            dict(x=torch.randn(3, 4), w=torch.randn(2, 4), b=torch.randn(3)),
            ValueError, r"bias must have shape \(2,\).*got \(3,\)", id="bias-shape"),
        pytest.param(
            dict(x=torch.randn(3, 4), w=torch.randn(2, 4), b=torch.randn(1, 2)),
            ValueError, r"bias must have shape \(2,\).*got \(1, 2\)", id="bias-2d"),
        pytest.param(
            dict(x=torch.randn(3, 4, dtype=f64), w=torch.randn(2, 4, dtype=f32)),
            TypeError, r"dtype.*input torch\.float64, weight torch\.float32", id="input-weight-dtype"),
        pytest.param(
            dict(x=torch.randn(3, 4), w=torch.randn(2, 4), b=torch.randn(2, dtype=f64)),
            TypeError, r"dtype.*weight torch\.float32, bias torch\.float64", id="input-bias-dtype"),
        pytest.param(
            dict(x=torch.randint(0, 5, (3, 4)), w=torch.randn(2, 4)),
            TypeError, r"floating.*input has dtype torch\.int64", id="int-input"),
        pytest.param(
            dict(x=torch.randn(3, 4), w=torch.randint(0, 5, (2, 4), dtype=torch.int32)),
            TypeError, r"floating.*weight has dtype torch\.int32", id="int-weight"),
        pytest.param(
            dict(x=torch.randn(3, 4), w=torch.randn(2, 4), b=torch.arange(2)),
            TypeError, r"floating.*bias has dtype torch\.int64", id="int-bias"),
        pytest.param(
            dict(x=torch.tensor(1.0), w=torch.randn(2, 1)),
            ValueError, r"0-d", id="0d-input"),
        pytest.param(
            dict(x=torch.randn(3, 4), w=torch.randn(8)),
            ValueError, r"weight must be 2-D.*\(8,\)", id="1d-weight"),
        pytest.param(
            dict(x=[[1.0, 2.0]], w=torch.randn(2, 2)),
            TypeError, r"input must be a torch\.Tensor; got list", id="list-input"),
    ]


@pytest.mark.parametrize("args,exc,pattern", _shape_and_dtype_cases())
def test_bad_tensors_meprop_linear(args, exc, pattern):
    w = args["w"]
    if w.is_floating_point():
        w.requires_grad_()
    with pytest.raises(exc, match=pattern):
        meprop_linear(args["x"], w, args.get("b"), k=1)
    assert w.grad is None


@pytest.mark.parametrize(
    "x,exc,pattern",
    [
        pytest.param(torch.randn(2, 4), ValueError, r"in_features=5.*\(2, 4\)", id="in_features-mismatch"),
        pytest.param(torch.randn(2, 5, dtype=torch.float64), TypeError,
                     r"input torch\.float64, weight torch\.float32", id="dtype-mismatch"),
        pytest.param(torch.ones(2, 5, dtype=torch.int64), TypeError,
                     r"input has dtype torch\.int64", id="int-input"),
    ],
)
def test_bad_input_module_changes_nothing(x, exc, pattern, trained_layer):
    before = snapshot(trained_layer)
    with pytest.raises(exc, match=pattern):
        trained_layer(x)
    assert_unchanged(trained_layer, before)


# ----------------------------------------------------------------- options

BAD_OPTIONS = [
    pytest.param(dict(selection="bogus"), ValueError,
                 r"selection must be one of 'topk', 'random'; got 'bogus'", id="selection"),
    pytest.param(dict(selection=None), ValueError, r"selection must be one of .*got None",
                 id="selection-None"),
    pytest.param(dict(backend="cuda"), ValueError,
                 r"backend must be one of 'auto', 'torch', 'triton'; got 'cuda'", id="backend"),
    pytest.param(dict(unified="yes"), TypeError, r"unified must be True or False; got 'yes'",
                 id="unified-str"),
    pytest.param(dict(sparse_grad=1), TypeError, r"sparse_grad must be True or False; got 1",
                 id="sparse_grad-int"),
]


@pytest.mark.parametrize("opts,exc,pattern", BAD_OPTIONS)
def test_bad_option_meprop_linear(opts, exc, pattern):
    w = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(exc, match=pattern):
        meprop_linear(torch.randn(2, 4), w, k=1, **opts)
    assert w.grad is None


@pytest.mark.parametrize("opts,exc,pattern", BAD_OPTIONS)
def test_bad_option_module(opts, exc, pattern):
    with pytest.raises(exc, match=pattern):
        MePropLinear(4, 3, k=1, **opts)


@pytest.mark.parametrize("opts,exc,pattern", BAD_OPTIONS)
def test_bad_option_from_linear(opts, exc, pattern):
    with pytest.raises(exc, match=pattern):
        MePropLinear.from_linear(nn.Linear(4, 3), k=1, **opts)


@pytest.mark.parametrize("opts,exc,pattern", BAD_OPTIONS)
def test_bad_option_convert_changes_nothing(opts, exc, pattern):
    model = small_model()
    before = snapshot(model)
    with pytest.raises(exc, match=pattern):
        convert(model, k=2, **opts)
    assert_unchanged(model, before)


def test_bad_generator_meprop_linear():
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator or None; got int"):
        meprop_linear(torch.randn(2, 4), torch.randn(3, 4), k=1, generator=0)


@pytest.mark.parametrize("value", [None, "0", "false"], ids=["unset", "0", "false"])
def test_triton_backend_on_cpu_without_interpreter(value, monkeypatch, trained_layer):
    if value is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", value)
    w = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"(?s)backend='triton'.*TRITON_INTERPRET.*'cpu'.*backend='torch'"):
        meprop_linear(torch.randn(2, 4), w, k=1, backend="triton")
    assert w.grad is None

    before = snapshot(trained_layer)
    trained_layer.backend = "triton"
    with pytest.raises(RuntimeError, match=r"(?s)TRITON_INTERPRET.*'cpu'"):
        trained_layer(torch.randn(2, 5))
    trained_layer.backend = "auto"
    assert_unchanged(trained_layer, before)


# ---------------------------------------------------------------- from_linear


def test_from_linear_refuses_non_linear():
    with pytest.raises(TypeError, match=r"from_linear expects an nn\.Linear; got Conv1d"):
        MePropLinear.from_linear(nn.Conv1d(2, 3, 1), k=1)


def test_from_linear_refuses_unknown_option():
    lin = nn.Linear(4, 3)
    with pytest.raises(TypeError, match=r"unexpected option\(s\): bogus"):
        MePropLinear.from_linear(lin, k=1, bogus=True)
    assert type(lin) is nn.Linear


# -------------------------------------------------------------------- convert


@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        pytest.param(dict(k=2, bogus=1), TypeError,
                     r"unexpected option\(s\) bogus; expected some of unified, selection, sparse_grad, backend",
                     id="unknown-option"),
        pytest.param(dict(k=2, exclude=["2", "nope"]), ValueError,
                     r"exclude pattern 'nope' matches no module.*named_modules", id="unmatched-name"),
        pytest.param(dict(k=2, exclude="enc*"), ValueError,
                     r"exclude pattern 'enc\*' matches no module", id="unmatched-pattern"),
        pytest.param(dict(k=2, exclude=3), TypeError,
                     r"exclude must be a module name or pattern.*predicate.*got int", id="exclude-int"),
        pytest.param(dict(k=2, exclude=["0", 3]), TypeError,
                     r"exclude patterns must be strings; got 3", id="exclude-list-with-int"),
        pytest.param(dict(k=2, exclude=[re.compile("0")]), TypeError,
                     r"exclude patterns must be strings; got re\.compile", id="exclude-regex"),
    ],
)
def test_bad_convert_changes_nothing(kwargs, exc, pattern):
    model = small_model()
    convert(model, k=3, exclude=["2"])  # already partly converted: must stay as it is
    model(torch.randn(2, 4)).sum().backward()
    before = snapshot(model)
    assert type(model[0]) is MePropLinear and type(model[2]) is nn.Linear
    with pytest.raises(exc, match=pattern):
        convert(model, **kwargs)
    assert_unchanged(model, before)
    assert model[0].k == 3


def test_convert_refuses_non_module():
    with pytest.raises(TypeError, match=r"convert expects an nn\.Module; got dict"):
        convert({"a": nn.Linear(2, 2)}, k=1)


def test_convert_bare_linear_refused_leaves_it_alone():
    lin = nn.Linear(4, 3)
    w = lin.weight
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        convert(lin, k=0)
    assert type(lin) is nn.Linear and lin.weight is w


def test_checks_hold_without_grad_too():
    """Under no_grad / inference_mode the module refuses what it refuses with grad: a
    layer that cannot train does not pass for one at evaluation time."""
    with torch.no_grad():
        layer = MePropLinear(3, 2, k=1, backend="triton")
        with pytest.raises(RuntimeError, match=r"backend='triton' needs CUDA tensors"):
            layer(torch.randn(2, 3))
        layer = MePropLinear(3, 2, k=1)
        layer.weight = nn.Parameter(torch.ones(2, 3, dtype=torch.int64), requires_grad=False)
        layer.bias = None
        with pytest.raises(TypeError, match=r"meProp needs floating-point tensors; input has dtype torch.int64"):
            layer(torch.ones(2, 3, dtype=torch.int64))
    with torch.inference_mode():
        layer = MePropLinear(3, 2, k=1, backend="triton", sparse_grad=True)
        with pytest.raises(RuntimeError, match=r"backend='triton'"):
            layer(torch.randn(2, 3))


def test_meta_device_layer_runs():
    layer = MePropLinear(4, 3, k=1, device="meta")
    assert layer(torch.ones(2, 4, device="meta")).shape == (2, 3)


# ------------------------------------------------------------- sparse inputs

_SPARSE_INPUTS = [
    pytest.param(lambda x: x.to_sparse(), "torch.sparse_coo", id="coo"),
    pytest.param(lambda x: x.to_sparse_csr(), "torch.sparse_csr", id="csr"),
]


_CSR_BETA = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state:UserWarning")


@_CSR_BETA
@pytest.mark.parametrize("k", [2, 5], ids=["k2", "dense-k"])
@pytest.mark.parametrize("opts", [{}, {"unified": False}, {"unified": False, "sparse_grad": True},
                                  {"sparse_grad": True}, {"selection": "random"}],
                         ids=["unified", "per-example", "per-example-sparse_grad", "sparse_grad", "random"])
@pytest.mark.parametrize("make,layout", _SPARSE_INPUTS)
def test_a_sparse_input_trains_as_the_dense_one(make, layout, opts, k):
    """As with nn.Linear, a sparse input (data: it needs no gradient) trains the layer:
    the gradients are those of the same input dense (the backward reads it densified)."""
    torch.manual_seed(0)
    x = torch.randn(6, 4) * (torch.rand(6, 4) < 0.5)

    def grads(inp):
        torch.manual_seed(0)
        model = nn.Sequential(MePropLinear(4, 5, k=k, **opts), nn.ReLU(), nn.Linear(5, 3))
        torch.manual_seed(1)  # the random draws
        model(inp).sum().backward()
        return [p.grad.to_dense() for p in model.parameters()]

    for got, want in zip(grads(make(x)), grads(x)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@_CSR_BETA
@pytest.mark.parametrize("make,layout", _SPARSE_INPUTS)
def test_a_sparse_input_that_requires_grad_is_refused_at_the_call(make, layout):
    torch.manual_seed(0)
    model = nn.Sequential(MePropLinear(4, 5, k=2), nn.ReLU(), nn.Linear(5, 3))
    x = make(torch.randn(6, 4)).requires_grad_()
    before = snapshot(model)
    msg = rf"takes a sparse input only when the input needs no gradient; this one has layout {layout} and requires grad"
    with pytest.raises(TypeError, match=msg):
        model(x)
    with pytest.raises(TypeError, match=msg):
        meprop_linear(x, model[0].weight, model[0].bias, k=2)
    assert_unchanged(model, before)
    with torch.no_grad():  # no backward to come: what nn.Linear computes
        assert torch.equal(model[0](x), nn.functional.linear(x, model[0].weight, model[0].bias))


def test_a_nested_input_is_refused_with_the_way_to_run_it():
    layer = MePropLinear(4, 5, k=2)
    nt = torch.nested.nested_tensor([torch.randn(2, 4), torch.randn(3, 4)], layout=torch.jagged)
    with pytest.raises(TypeError, match=r"layout torch.jagged: apply the layer to its packed rows \(input.values\(\)\)"):
        layer(nt)


@_CSR_BETA
@pytest.mark.parametrize("make,layout", _SPARSE_INPUTS)
def test_sparse_input_to_conv1d_is_refused_with_its_layout(make, layout):
    from meprop_triton import MePropConv1D

    layer = MePropConv1D(5, 4, k=2)
    for ctx in (torch.enable_grad(), torch.no_grad()):  # Conv1D's own x.view takes neither
        with ctx, pytest.raises(TypeError, match=rf"MePropConv1D needs dense \(strided\) tensors; input has layout {layout}"):
            layer(make(torch.randn(6, 4)))


def test_exclude_as_bytes_is_named_as_bytes():
    model = small_model()
    with pytest.raises(TypeError, match=r"exclude must be a module name or pattern.*got bytes b'0'"):
        convert(model, k=2, exclude=b"0")
    assert all(type(m) is not MePropLinear for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int32, "float32"])
def test_a_layer_of_a_dtype_it_could_never_run_in_is_refused_when_built(dtype):
    from meprop_triton import MePropConv1D

    for build in (lambda: MePropLinear(3, 4, k=2, dtype=dtype), lambda: MePropConv1D(4, 3, k=2, dtype=dtype)):
        with pytest.raises(TypeError, match=rf"dtype must be a floating-point torch.dtype.*got {re.escape(repr(dtype))}"):
            build()


def test_from_linear_refuses_a_lazy_layer_until_it_is_materialised():
    lazy = nn.LazyLinear(3)
    with pytest.raises(TypeError, match=r"initialised parameters; this LazyLinear's are not materialised yet"):
        MePropLinear.from_linear(lazy, k=2)
    lazy(torch.randn(2, 5))
    layer = MePropLinear.from_linear(lazy, k=2)
    assert layer.weight is lazy.weight and layer.in_features == 5
