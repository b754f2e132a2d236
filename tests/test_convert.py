"""``convert``: swapping the ``nn.Linear`` layers of an existing model."""

from __future__ import annotations

import copy
import fractions
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.utils.prune
from torch import nn

from meprop_triton import ConversionReport, MePropLinear, apply_settings, convert, meprop_settings


class Net(nn.Module):
    """Linear layers at several depths: encoder.0, encoder.2, head.proj, head.classifier."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
        self.head = nn.ModuleDict({"proj": nn.Linear(16, 12), "classifier": nn.Linear(12, 3)})

    def forward(self, x):
        h = torch.relu(self.head["proj"](self.encoder(x)))
        return self.head["classifier"](h)


LINEAR_NAMES = ["encoder.0", "encoder.2", "head.proj", "head.classifier"]


def linear_types(model):
    return {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def make_net(seed=0):
    torch.manual_seed(seed)
    return Net()


def test_converts_every_linear_and_returns_model():
    model = make_net()
    params = dict(model.named_parameters())
    out = convert(model, k=0.5)
    assert out is model
    assert linear_types(model) == {n: MePropLinear for n in LINEAR_NAMES}
    for name in LINEAR_NAMES:
        layer = model.get_submodule(name)
        assert layer.k == 0.5
        assert layer.k_units == -(-layer.out_features // 2)
    new_params = dict(model.named_parameters())
    assert list(new_params) == list(params)
    for n, p in params.items():
        assert new_params[n] is p, f"{n} must be the same Parameter object"


def test_converted_model_trains_with_sparse_rows():
    model = make_net()
    convert(model, k=4, backend="torch")
    model(torch.randn(5, 8)).sum().backward()
    for name in LINEAR_NAMES:
        layer = model.get_submodule(name)
        assert layer.backend == "torch"
        assert int((layer.weight.grad != 0).any(1).sum()) == min(4, layer.out_features)


@pytest.mark.parametrize(
    "exclude,dense",
    [
        pytest.param(["head.classifier"], ["head.classifier"], id="exact-name"),
        pytest.param("head.classifier", ["head.classifier"], id="exact-name-str"),
        pytest.param(["encoder.2", "head.proj"], ["encoder.2", "head.proj"], id="two-names"),
        pytest.param(["*.classifier"], ["head.classifier"], id="pattern-suffix"),
        pytest.param(["head.c*"], ["head.classifier"], id="pattern-prefix"),
        pytest.param(["encoder.[02]"], ["encoder.0", "encoder.2"], id="pattern-class"),
        pytest.param(["encoder"], ["encoder.0", "encoder.2"], id="parent"),
        pytest.param(["head"], ["head.proj", "head.classifier"], id="parent-moduledict"),
        pytest.param(lambda name, m: m.out_features == 16, ["encoder.0", "encoder.2"], id="predicate"),
        pytest.param(lambda name, m: name.startswith("head"), ["head.proj", "head.classifier"],
                     id="predicate-name"),
        pytest.param(None, [], id="none"),
        pytest.param([], [], id="empty-list"),
    ],
)
def test_exclude(exclude, dense):
    model = make_net()
    convert(model, k=2, exclude=exclude)
    expected = {n: (nn.Linear if n in dense else MePropLinear) for n in LINEAR_NAMES}
    assert linear_types(model) == expected


def test_exclude_predicate_sees_names_and_modules():
    model = make_net()
    seen = []

    def pred(name, module):
        seen.append((name, type(module)))
        return False

    convert(model, k=2, exclude=pred)
    assert sorted(seen) == sorted((n, nn.Linear) for n in LINEAR_NAMES)
    # the report names what excluded a layer: the predicate, or the pattern that matched
    _, report = convert(make_net(), k=2, exclude=lambda name, m: name == "encoder.0", report=True)
    assert report.left_dense == {"encoder.0": "excluded (by the exclude predicate)"}
    _, report = convert(make_net(), k=2, exclude=["head.classifier", "enc*"], report=True)
    assert report.left_dense == {n: "excluded (by 'enc*')" for n in LINEAR_NAMES if n.startswith("encoder")} | {
        "head.classifier": "excluded (by 'head.classifier')"}


def test_multihead_attention_out_proj_stays_plain():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    out_proj = layer.self_attn.out_proj
    out_proj_type = type(out_proj)
    convert(layer, k=0.25)
    assert type(layer.linear1) is MePropLinear and type(layer.linear2) is MePropLinear
    assert layer.self_attn.out_proj is out_proj
    assert type(layer.self_attn.out_proj) is out_proj_type
    assert not any(isinstance(m, MePropLinear) for m in layer.self_attn.modules())
    # The converted layer still runs forward and backward.
    x = torch.randn(2, 5, 16, requires_grad=True)
    layer(x).sum().backward()
    assert int((layer.linear1.weight.grad != 0).any(1).sum()) == 8
    assert x.grad is not None


class _DirectQkv(nn.Module):
    """timm's BEiT / EVA / Swin V2 attention: ``F.linear(x, self.qkv.weight, bias)``
    when it has a q/v bias; ``proj`` called as a layer, ``out`` read for its dtype and
    type only, ``back`` multiplied in directly through ``@``."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(24))
        self.proj = nn.Linear(24, 8)
        self.out = nn.Linear(8, 8)
        self.back = nn.Linear(8, 8)

    def forward(self, x):
        qkv = torch.nn.functional.linear(x, weight=self.qkv.weight, bias=self.q_bias)
        h = self.proj(qkv)
        if isinstance(self.out.weight, torch.Tensor) and h.dtype != self.out.weight.dtype:
            h = h.to(self.out.weight.dtype)
        return self.out(h) + h @ self.back.weight.t()


def test_a_weight_used_without_calling_its_layer_stays_dense_and_says_why():
    """A layer whose parent hands its weight to a product itself would keep a dense
    backward under meProp's name: convert leaves it alone and the report says why,
    with the call; reading the weight's dtype or type does not count."""
    model, report = convert(nn.Sequential(_DirectQkv()), k=2, report=True)
    assert sorted(report.converted) == ["0.out", "0.proj"]
    assert type(model[0].qkv) is nn.Linear and type(model[0].back) is nn.Linear
    assert "_DirectQkv.forward uses its weight without calling the layer" in report.left_dense["0.qkv"]
    assert "linear(x, weight=self.qkv.weight, bias=self.q_bias)" in report.left_dense["0.qkv"]
    assert "h @ self.back.weight.t()" in report.left_dense["0.back"]
    model(torch.randn(5, 8)).pow(2).sum().backward()
    assert int((model[0].proj.weight.grad != 0).any(1).sum()) == 2
    assert report.notes == {}


class _SometimesDirect(nn.Module):
    """timm's BEiT with and without a q/v bias: the layer is called in one case, its
    weight handed to F.linear in the other."""

    def __init__(self, bias):
        super().__init__()
        self.qkv = nn.Linear(8, 24, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(24)) if bias else None

    def forward(self, x):
        if self.q_bias is None:
            return self.qkv(x)
        return torch.nn.functional.linear(x, self.qkv.weight, self.q_bias)


@pytest.mark.parametrize("bias", [False, True], ids=["calls-the-layer", "uses-the-weight"])
def test_a_layer_called_in_some_cases_only_is_converted_with_a_note(bias):
    """Where the parent's forward calls the layer in some cases, it is converted (it runs
    meProp there), and the report's note names the other path, whose backward is
    dense: the gradient shows which path this instance takes."""
    model, report = convert(nn.Sequential(_SometimesDirect(bias)), k=2, report=True)
    assert list(report.converted) == ["0.qkv"] and type(model[0].qkv) is MePropLinear
    assert "in some cases uses its weight without calling it" in report.notes["0.qkv"]
    assert "note        0.qkv:" in str(report)
    model(torch.randn(5, 8)).pow(2).sum().backward()
    assert int((model[0].qkv.weight.grad != 0).any(1).sum()) == (24 if bias else 2)


def test_multihead_attention_inside_a_model():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True),
        num_layers=2, enable_nested_tensor=False,
    )
    model = nn.Sequential(enc, nn.Linear(8, 4))
    convert(model, k=2)
    converted = sorted(n for n, m in model.named_modules() if type(m) is MePropLinear)
    assert converted == ["0.layers.0.linear1", "0.layers.0.linear2",
                         "0.layers.1.linear1", "0.layers.1.linear2", "1"]
    for i in range(2):
        assert not isinstance(model[0].layers[i].self_attn.out_proj, MePropLinear)


def test_shared_linear_stays_shared():
    torch.manual_seed(0)
    shared = nn.Linear(6, 6)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = shared
            self.b = nn.Sequential(nn.ReLU(), shared)

        def forward(self, x):
            return self.b(self.a(x))

    model = Tied()
    convert(model, k=2)
    assert type(model.a) is MePropLinear
    assert model.a is model.b[1]
    assert model.a.weight is shared.weight
    assert len(list(model.parameters())) == 2


@pytest.mark.parametrize("exclude", [["a"], ["b"], ["b.1"]], ids=lambda e: e[0])
def test_shared_linear_excluded_in_one_place_stays_dense_and_shared(exclude):
    shared = nn.Linear(6, 6)
    model = nn.Module()
    model.a = shared
    model.b = nn.Sequential(nn.ReLU(), shared)
    model.c = nn.Linear(6, 2)
    convert(model, k=2, exclude=exclude)
    assert model.a is model.b[1] is shared
    assert type(model.c) is MePropLinear


def test_state_dict_loads_into_unconverted_copy():
    model = make_net(1)
    fresh = copy.deepcopy(model)
    convert(model, k=3, exclude=["head.classifier"])
    # Train a few steps so the weights differ from the copy's.
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(7, 8)).pow(2).mean().backward()
        opt.step()
    x = torch.randn(10, 8)
    assert not torch.equal(fresh(x), model(x))
    assert list(model.state_dict()) == list(fresh.state_dict())
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert all(type(m) is not MePropLinear for m in fresh.modules())
    assert torch.equal(fresh(x), model(x))


def test_bare_linear_returns_meprop_linear():
    lin = nn.Linear(5, 4)
    out = convert(lin, k=2, backend="torch")
    assert type(out) is MePropLinear and out is not lin
    assert out.weight is lin.weight and out.bias is lin.bias
    assert out.k == 2 and out.backend == "torch"
    assert type(lin) is nn.Linear
    x = torch.randn(3, 5)
    assert torch.equal(out(x), lin(x))


def test_bare_linear_excluded_is_returned_unchanged():
    lin = nn.Linear(5, 4)
    with pytest.warns(UserWarning, match=r"changed nothing.*excluded"):
        assert convert(lin, k=2, exclude=lambda name, m: True) is lin


def test_convert_again_updates_k():
    model = make_net()
    params = list(model.parameters())
    convert(model, k=2)
    first = model.encoder[0]
    convert(model, k=0.5)
    assert all(model.get_submodule(n).k == 0.5 for n in LINEAR_NAMES)
    assert model.encoder[0].weight is first.weight
    assert all(p is q for p, q in zip(params, model.parameters()))
    model(torch.randn(4, 8)).sum().backward()
    assert int((model.encoder[0].weight.grad != 0).any(1).sum()) == 8


def test_linear_subclass_is_left_alone():
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(MyLinear(3, 3), nn.Linear(3, 3))
    convert(model, k=1)
    assert type(model[0]) is MyLinear and type(model[1]) is MePropLinear


def test_training_mode_kept():
    model = make_net().eval()
    convert(model, k=2)
    assert all(not m.training for m in model.modules())


# --- the report, tied weights, and saving / loading the settings ------------------------


def test_report_names_what_was_converted_and_why_the_rest_stayed_dense():
    class MyLinear(nn.Linear):
        pass

    model = make_net()
    model.extra = MyLinear(3, 3)
    model.attn = nn.MultiheadAttention(12, 2)
    model.rnn = nn.LSTM(4, 4)
    out, report = convert(model, k=2, exclude=["head.classifier"], report=True)
    assert out is model and isinstance(report, ConversionReport)
    assert report.converted == {"encoder.0": "Linear", "encoder.2": "Linear", "head.proj": "Linear"}
    assert set(report.left_dense) == {"head.classifier", "extra", "attn.out_proj", "rnn"}
    assert report.left_dense["head.classifier"].startswith("excluded")
    assert "subclass of nn.Linear" in report.left_dense["extra"]
    assert "MultiheadAttention" in report.left_dense["attn.out_proj"]
    assert "lstm=True" in report.left_dense["rnn"]
    text = str(report)
    assert text.splitlines()[0] == "meProp convert: 3 layer(s) converted (3 Linear), 4 left dense"
    assert "  converted   encoder.0 (Linear)" in text and "  left dense  head.classifier: excluded" in text


def test_a_second_convert_for_another_k_reports_the_meprop_layers_it_left_as_unchanged():
    """Another k for some layers: convert again with the others excluded. Those stay
    meProp layers with their settings, so the report lists them as unchanged, not as
    left dense (as it did); so does a MePropLSTM when lstm=True is not passed."""
    from meprop_triton import MePropLSTM

    model = make_net()
    model.rnn = MePropLSTM(4, 4, k=1)
    convert(model, k=2, exclude=["head.classifier"])
    _, report = convert(model, k=0.5, exclude=["encoder.*", "head.classifier"], report=True)
    assert model.encoder[0].k == 2 and model.head.proj.k == 0.5
    assert report.converted == {"head.proj": "MePropLinear"}
    assert report.left_dense == {"head.classifier": "excluded (by 'head.classifier')"}
    assert report.unchanged == {"encoder.0": "excluded (by 'encoder.*')", "encoder.2": "excluded (by 'encoder.*')",
                                "rnn": "a MePropLSTM: pass lstm=True to change its settings"}
    text = str(report)
    assert text.splitlines()[0] == ("meProp convert: 1 layer(s) converted (1 MePropLinear), 1 left dense, "
                                    "3 meProp layer(s) unchanged")
    assert "  unchanged   encoder.0: excluded (by 'encoder.*')" in text
    with pytest.warns(UserWarning, match=r"changed nothing.*encoder\.0: excluded"):
        convert(model, k=3, exclude=["encoder", "head"])


def test_report_false_returns_the_model_alone_and_warns_only_when_nothing_changed():
    model = make_net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert convert(model, k=2) is model


def test_nothing_to_convert_warns():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    with pytest.warns(UserWarning, match=r"changed nothing in this Sequential: it has no layer that convert swaps \(nn.Linear, transformers Conv1D"):
        out, report = convert(model, k=2, report=True)
    assert out is model and report.converted == {} and report.left_dense == {}
    everything_excluded = make_net()
    with pytest.warns(UserWarning, match=r"changed nothing.*encoder.0: excluded"):
        convert(everything_excluded, k=2, exclude=lambda n, m: True)


class TiedLM(nn.Module):
    """An embedding whose weight the output layer shares (GPT-2's lm_head and wte)."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(10, 6)
        self.body = nn.Linear(6, 6)
        self.lm_head = nn.Linear(6, 10, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        return self.lm_head(torch.relu(self.body(self.wte(ids))))


def test_tied_weight_stays_dense_by_default_and_is_named():
    torch.manual_seed(0)
    model = TiedLM()
    _, report = convert(model, k=2, report=True)
    assert type(model.lm_head) is nn.Linear and type(model.body) is MePropLinear
    assert report.converted == {"body": "Linear"}
    assert report.left_dense["lm_head"] == "tied: its weight is wte.weight too; pass tied='convert' to convert it anyway"


def test_tied_convert_converts_it_and_keeps_the_parameter_shared():
    torch.manual_seed(0)
    model = TiedLM()
    _, report = convert(model, k=2, tied="convert", report=True)
    assert type(model.lm_head) is MePropLinear and model.lm_head.weight is model.wte.weight
    assert set(report.converted) == {"body", "lm_head"}
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    # the shared weight gets the embedding's rows (ids 1-3) plus meProp's 2 rows
    assert 2 <= int((model.wte.weight.grad != 0).any(1).sum()) <= 5
    with pytest.raises(ValueError, match=r"tied must be 'skip' or 'convert'; got 'yes'"):
        convert(TiedLM(), k=2, tied="yes")
    with pytest.raises(TypeError, match=r"report must be True or False; got 1"):
        convert(TiedLM(), k=2, report=1)


def test_a_layer_shared_in_two_places_is_not_called_tied():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    _, report = convert(model, k=2, report=True)
    assert type(model[0]) is MePropLinear and model[0] is model[2]
    assert report.converted == {"0": "Linear"} and report.left_dense == {}


def test_settings_round_trip_through_json_and_a_dense_copy():
    torch.manual_seed(0)
    model = nn.Sequential(make_net(), nn.LSTM(3, 5))
    convert(model, k=0.5, exclude=["0.head.classifier"], lstm=True, unified=False)
    convert(model[0].encoder, k=3, backend="torch")
    settings = json.loads(json.dumps(meprop_settings(model)))
    assert settings["0.encoder.0"] == {"type": "MePropLinear", "k": 3, "unified": True, "selection": "topk",
                                       "sparse_grad": False, "backend": "torch", "track_selection": False}
    assert settings["0.head.proj"]["k"] == 0.5 and settings["0.head.proj"]["unified"] is False
    assert settings["1"] == {"type": "MePropLSTM", "k": 0.5, "unified": False, "selection": "topk", "sparse_grad": False}
    assert "0.head.classifier" not in settings
    torch.manual_seed(1)
    fresh = nn.Sequential(make_net(1), nn.LSTM(3, 5))
    fresh.load_state_dict(model.state_dict())
    assert apply_settings(fresh, settings) is fresh
    assert [type(m) for m in fresh.modules()] == [type(m) for m in model.modules()]
    assert meprop_settings(fresh) == settings


def test_apply_settings_swaps_a_shared_layer_everywhere():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    apply_settings(model, {"0": {"type": "MePropLinear", "k": 2}})
    assert type(model[0]) is MePropLinear and model[0] is model[2]


@pytest.mark.parametrize(
    "settings,error,match",
    [
        ({"nope": {"type": "MePropLinear", "k": 2}}, ValueError, r"module 'nope' that this Net does not have"),
        ({"encoder.1": {"type": "MePropLinear", "k": 2}}, ValueError, r"'encoder.1' is a ReLU"),
        ({"encoder.0": {"type": "MePropConv1D", "k": 2}}, ValueError, r"'encoder.0' is a Linear"),
        ({"encoder.0": {"type": "Linear", "k": 2}}, ValueError, r"must be one of MePropLinear"),
        ({"encoder.0": {"type": "MePropLinear", "k": 0}}, ValueError, r"k must be an int >= 1"),
        ({"encoder.0": {"type": "MePropLinear"}}, ValueError, r"'k' is missing"),
        ({"encoder.0": {"type": "MePropLinear", "k": 2, "speed": 1}}, ValueError, r"unexpected speed"),
        ({"encoder.0": {"type": "MePropLinear", "k": 2, "backend": "gpu"}}, ValueError, r"backend must be one of"),
        ([("encoder.0", 2)], TypeError, r"settings must be a dict"),
    ],
    ids=["no-module", "not-a-layer", "wrong-kind", "bad-type", "bad-k", "no-k", "extra-key", "bad-option", "list"],
)
def test_apply_settings_refuses_bad_entries_and_changes_nothing(settings, error, match):
    model = make_net()
    # a good entry first: refused entries later must not leave it half-applied
    good = {"head.proj": {"type": "MePropLinear", "k": 2}}
    bad = {**good, **settings} if isinstance(settings, dict) else settings
    with pytest.raises(error, match=match):
        apply_settings(model, bad)
    assert all(type(m) is not MePropLinear for m in model.modules())


@pytest.mark.parametrize("late", ["pruned", "proj_size"])
def test_apply_settings_refused_while_building_a_layer_changes_nothing(late):
    """Entries that pass the checks but whose layer cannot be wrapped (a pruned weight is
    computed, an LSTM with proj_size): the earlier entries must not be swapped in already."""
    model = nn.ModuleDict({"a": nn.Linear(4, 6), "b": nn.Linear(6, 3), "rnn": nn.LSTM(4, 6, proj_size=2)})
    torch.nn.utils.prune.l1_unstructured(model["b"], "weight", amount=0.5)
    before = dict(model.named_children())
    settings = {"a": {"type": "MePropLinear", "k": 2}}
    if late == "pruned":
        settings["b"] = {"type": "MePropLinear", "k": 1}
        error, match = TypeError, r"settings\['b'\]: from_linear needs a layer whose weight is a Parameter"
    else:
        settings["rnn"] = {"type": "MePropLSTM", "k": 2}
        error, match = NotImplementedError, r"settings\['rnn'\]: MePropLSTM does not support proj_size"
    with pytest.raises(error, match=match):
        apply_settings(model, settings)
    assert dict(model.named_children()) == before


def test_apply_settings_refuses_two_settings_for_one_shared_layer():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    with pytest.raises(ValueError, match=r"settings\['0'\] and settings\['2'\] name one shared layer"):
        apply_settings(model, {"0": {"type": "MePropLinear", "k": 1}, "2": {"type": "MePropLinear", "k": 1.0}})
    assert type(model[0]) is nn.Linear
    # the same settings under both names are one conversion
    apply_settings(model, {"0": {"type": "MePropLinear", "k": 2}, "2": {"type": "MePropLinear", "k": 2}})
    assert type(model[0]) is MePropLinear and model[0] is model[2] and model[0].k == 2


@pytest.mark.parametrize("bad_type", [["MePropLinear"], None, 3])
def test_apply_settings_names_a_type_that_is_not_a_string(bad_type):
    with pytest.raises(ValueError, match=r"settings\['0'\]\['type'\] must be one of MePropLinear"):
        apply_settings(nn.Sequential(nn.Linear(4, 4)), {"0": {"type": bad_type, "k": 2}})


@pytest.mark.parametrize("k", [np.int64(2), fractions.Fraction(1, 2), np.float32(0.5)], ids=["np.int64", "Fraction", "np.float32"])
def test_settings_are_json_ready_whatever_number_type_k_was_given_as(k):
    model = convert(nn.Sequential(nn.Linear(4, 6), nn.LSTM(6, 4)), k=k, lstm=True)
    settings = json.loads(json.dumps(meprop_settings(model)))
    assert settings["0"]["k"] == settings["1"]["k"] == (2 if isinstance(k, np.integer) else 0.5)
    fresh = nn.Sequential(nn.Linear(4, 6), nn.LSTM(6, 4))
    apply_settings(fresh, settings)
    assert fresh[0].k == settings["0"]["k"] and fresh[1].k == settings["1"]["k"]


def test_convert_names_the_layer_it_cannot_convert():
    model = nn.ModuleDict({"a": nn.Linear(4, 6), "rnn": nn.LSTM(4, 6, proj_size=2)})
    with pytest.raises(NotImplementedError, match=r"cannot convert rnn: MePropLSTM does not support proj_size"):
        convert(model, k=2, lstm=True)
    assert type(model["a"]) is nn.Linear


def _with_instance_forward(lin: nn.Linear) -> nn.Linear:
    """What accelerate's add_hook_to_module does: a forward set on the instance."""
    import types

    lin.register_buffer("scale", torch.full((lin.out_features,), 2.0))
    inner = lin.forward
    lin.forward = types.MethodType(lambda self, x: inner(x) * self.scale, lin)
    return lin


def test_a_layer_whose_instance_carries_more_stays_dense_and_says_why():
    """A swap would lose a forward set on the instance, or parameters / buffers /
    submodules besides weight and bias: such a layer stays dense (report) and from_linear
    / apply_settings refuse it; plain attributes set on it are carried over."""
    torch.manual_seed(0)
    model = nn.Sequential(_with_instance_forward(nn.Linear(4, 6)), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    model[2].register_buffer("stats", torch.zeros(5))
    model[4].tag = "head"
    x = torch.randn(3, 4)
    before, keys = model(x), list(model.state_dict())
    _, report = convert(model, k=2, report=True)
    assert report.converted == {"4": "Linear"}
    assert "forward is replaced on the instance" in report.left_dense["0"]
    assert "it holds stats besides its own parameters" in report.left_dense["2"]
    assert type(model[4]) is MePropLinear and model[4].tag == "head"
    assert torch.equal(model(x), before) and list(model.state_dict()) == keys
    with pytest.raises(TypeError, match=r"from_linear cannot wrap this Linear: its forward is replaced"):
        MePropLinear.from_linear(model[0], k=2)
    fresh = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5))
    fresh[2].register_buffer("stats", torch.zeros(5))
    with pytest.raises(ValueError, match=r"settings\['2'\]: this model's '2' cannot be swapped: it holds stats"):
        apply_settings(fresh, {"0": {"type": "MePropLinear", "k": 2}, "2": {"type": "MePropLinear", "k": 2}})
    assert type(fresh[0]) is nn.Linear
