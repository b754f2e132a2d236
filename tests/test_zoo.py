"""meProp on real third-party models: transformers' BERT and GPT-2, a timm ViT.

Tiny models built from configs with random weights, on the CPU; nothing is downloaded
(no tokenizer, no pretrained weights; the hub is switched off). Each model is converted,
trained a few steps next to its dense twin, compiled once, saved and loaded back
converted; BERT also trains under transformers' ``Trainer``. These need the optional
extra ``pip install -e '.[zoo]'`` (transformers, timm, accelerate); without it each is
skipped with the reason.
"""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from meprop_triton import (  # noqa: E402
    ConversionReport,
    MePropConv1D,
    MePropLinear,
    apply_settings,
    convert,
    meprop_settings,
    reference,
)

def _transformers():
    """transformers, or None with the reason it cannot be used. (Not
    ``pytest.importorskip``: a module skipped whole collects no test, and pytest then
    exits with status 5, which CI would read as a failure.)"""
    try:
        import transformers
    except Exception as e:  # noqa: BLE001 - any failure to import is a reason to skip
        return None, f"transformers is not usable here (the optional extra: pip install -e '.[zoo]'): {type(e).__name__}: {e}"
    return transformers, None


transformers, TRANSFORMERS_SKIP = _transformers()
needs_transformers = pytest.mark.skipif(transformers is None, reason=TRANSFORMERS_SKIP or "")


def _timm():
    """timm, or None with the reason it cannot be used (it needs a torchvision built for
    the installed torch; a mismatched one fails at import with a RuntimeError)."""
    try:
        import timm.models.vision_transformer as vit
    except Exception as e:  # noqa: BLE001 - any failure to import is a reason to skip
        return None, f"timm is not usable here: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return vit, None


VIT, TIMM_SKIP = _timm()
needs_timm = pytest.mark.skipif(VIT is None, reason=TIMM_SKIP or "")

VOCAB = 128


def gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def bert(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        vocab_size=VOCAB, max_position_embeddings=32, num_labels=3,
    )
    return transformers.BertForSequenceClassification(config)


def vit(seed=0):
    torch.manual_seed(seed)
    return VIT.VisionTransformer(img_size=32, patch_size=8, embed_dim=96, depth=2, num_heads=2, num_classes=10)


def conv1d_names(model):
    return [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]


def train(model, batches, loss_fn, steps, lr=3e-3):
    """Adam on the same batches; the losses, one per step."""
    torch.manual_seed(123)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, batches[i % len(batches)])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def cls_loss(model, batch):
    ids, labels = batch
    return model(input_ids=ids, labels=labels).loss


def vit_loss(model, batch):
    images, labels = batch
    return nn.functional.cross_entropy(model(images), labels)


def assert_trains_next_to_dense(dense, converted, batches, loss_fn, steps):
    # dropout off in both, so the runs differ by meProp's backward only
    dense_losses = train(dense, batches, loss_fn, steps)
    meprop_losses = train(converted, batches, loss_fn, steps)
    assert meprop_losses[0] == pytest.approx(dense_losses[0], rel=1e-5)  # same weights, same forward
    assert meprop_losses != dense_losses  # and a different backward
    # both learn the fixed batches: the last losses well below the first
    assert dense_losses[-1] < 0.8 * dense_losses[0], dense_losses
    assert meprop_losses[-1] < 0.8 * meprop_losses[0], meprop_losses
    return dense_losses, meprop_losses


# --- GPT-2 ---------------------------------------------------------------------------


@needs_transformers
def test_gpt2_converts_every_conv1d_and_leaves_the_tied_lm_head_dense(capsys):
    model = gpt2()
    names = conv1d_names(model)
    assert len(names) == 8  # c_attn, c_proj (attention), c_fc, c_proj (MLP), two blocks
    assert model.lm_head.weight is model.transformer.wte.weight
    out, report = convert(model, k=0.1, report=True)
    print(report)
    assert out is model and isinstance(report, ConversionReport)
    assert sorted(report.converted) == sorted(names)
    assert set(report.converted.values()) == {"Conv1D"}
    assert all(type(model.get_submodule(n)) is MePropConv1D for n in names)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.transformer.wte.weight
    assert list(report.left_dense) == ["lm_head"]
    assert report.left_dense["lm_head"].startswith("tied: its weight is transformer.wte.weight too")
    c_attn = model.transformer.h[0].attn.c_attn
    assert (c_attn.nf, c_attn.nx, c_attn.k_units) == (192, 64, 20)
    assert "lm_head: tied" in capsys.readouterr().out


@needs_transformers
def test_gpt2_tied_convert_converts_lm_head_too():
    model = gpt2()
    _, report = convert(model, k=0.1, tied="convert", report=True)
    assert type(model.lm_head) is MePropLinear and model.lm_head.weight is model.transformer.wte.weight
    assert len(report.converted) == 9 and report.left_dense == {}


@needs_transformers
def test_gpt2_trains_next_to_its_dense_twin():
    dense = gpt2()
    for m in dense.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    converted = convert(copy.deepcopy(dense), k=0.1)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, VOCAB, (4, 16), generator=g) for _ in range(2)]
    assert_trains_next_to_dense(dense, converted, batches, lm_loss, steps=12)


@needs_transformers
def test_gpt2_under_bf16_autocast_as_its_dense_twin():
    """Mixed precision, as GPT-2 is trained: fp32 weights, the forward under autocast.
    c_attn gets LayerNorm's fp32 output, c_proj the attention's bf16 one, against fp32
    weights: the converted model's loss equals the dense one's, its gradients are fp32
    and, with every unit kept, equal to the dense model's; with k=0.1 it trains."""
    dense = gpt2()
    for m in dense.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    full = convert(copy.deepcopy(dense), k=1.0)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (dense, full):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lm_loss(model, ids)
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == losses[0]
    for (name, p_dense), (_, p_full) in zip(dense.named_parameters(), full.named_parameters()):
        assert p_full.grad.dtype == torch.float32, name
        torch.testing.assert_close(p_full.grad, p_dense.grad, rtol=0, atol=0, msg=name)

    def autocast_loss(model, batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return lm_loss(model, batch)

    batches = [torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))]
    dense.zero_grad(set_to_none=True)
    assert_trains_next_to_dense(dense, convert(copy.deepcopy(dense), k=0.1), batches, autocast_loss, steps=12)


@needs_transformers
def test_gpt2_state_dict_loads_into_a_plain_model_and_back():
    model = convert(gpt2(0), k=0.1)
    train(model, [torch.randint(0, VOCAB, (2, 8))], lm_loss, steps=2)  # weights of its own
    plain = gpt2(1)
    ids = torch.randint(0, VOCAB, (2, 12))
    model.eval(), plain.eval()
    assert not torch.equal(plain(ids).logits, model(ids).logits)
    assert list(plain.state_dict()) == list(model.state_dict())
    plain.load_state_dict(model.state_dict(), strict=True)
    assert not any(isinstance(m, MePropConv1D) for m in plain.modules())
    assert torch.equal(plain(ids).logits, model(ids).logits)
    other = convert(gpt2(2), k=0.1)
    other.load_state_dict(plain.state_dict(), strict=True)
    other.eval()
    assert torch.equal(other(ids).logits, model(ids).logits)


@needs_transformers
def test_gpt2_conv1d_gradients_equal_the_definition_fp64():
    """c_attn of block 0 in a converted fp64 GPT-2: its gradients against
    ``reference`` on the transposed weight, from the layer's own input and output grad."""
    model = convert(gpt2().double(), k=0.1, backend="torch")
    model.eval()  # no dropout: one deterministic forward
    layer = model.transformer.h[0].attn.c_attn
    seen = {}

    def keep(module, args, output):
        args[0].retain_grad()
        output.retain_grad()
        seen["x"], seen["y"] = args[0], output

    layer.register_forward_hook(keep)
    ids = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(1))
    lm_loss(model, ids).backward()
    x, y = seen["x"], seen["y"]
    G = y.grad.reshape(-1, 192)
    X = x.detach().reshape(-1, 64)
    W = layer.weight.detach().t()  # (out, in): the linear layout the reference takes
    idx = reference.unified_topk_indices(G, layer.k_units)
    gx, gw, gb = reference.unified_backward(G, X, W, idx)
    assert idx.numel() == 20
    torch.testing.assert_close(x.grad.reshape(-1, 64), gx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.weight.grad, gw.t(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, gb, rtol=1e-10, atol=1e-12)
    kept = (layer.weight.grad != 0).any(0).nonzero().flatten()
    assert torch.equal(kept, idx)


@needs_transformers
def test_gpt2_compiles_in_one_graph():
    """The model compiled with fullgraph=True (the loss is taken outside: transformers'
    own loss function logs a warning, which is a graph break of its own)."""
    model = convert(gpt2(), k=0.1)
    model.eval()
    ids = torch.randint(0, VOCAB, (2, 8))

    def loss_of(m):
        logits = m(input_ids=ids).logits[:, :-1]
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    eager_loss = loss_of(model)
    eager_loss.backward()
    eager = model.transformer.h[0].mlp.c_fc.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    loss = loss_of(torch.compile(model, backend="aot_eager", fullgraph=True))
    loss.backward()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    got = model.transformer.h[0].mlp.c_fc.weight.grad
    assert int((got != 0).any(0).sum()) == 26  # 10% of 256 units, rounded up
    assert torch.equal((got != 0).any(0), (eager != 0).any(0))  # the same kept units
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-6)


@needs_transformers
def test_gpt2_save_pretrained_and_load_converted(tmp_path):
    model = convert(gpt2(), k=0.1, unified=False)
    model.config.meprop = meprop_settings(model)  # recorded in config.json
    model.save_pretrained(tmp_path)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    assert not any(isinstance(m, MePropConv1D) for m in loaded.modules())  # loads dense
    apply_settings(loaded, loaded.config.meprop)
    assert meprop_settings(loaded) == model.config.meprop
    assert all(type(loaded.get_submodule(n)) is MePropConv1D for n in conv1d_names(gpt2()))
    assert loaded.transformer.h[1].mlp.c_fc.unified is False
    assert loaded.lm_head.weight is loaded.transformer.wte.weight and type(loaded.lm_head) is nn.Linear
    ids = torch.randint(0, VOCAB, (2, 8))
    model.eval(), loaded.eval()
    assert torch.equal(model(ids).logits, loaded(ids).logits)


# --- BERT ----------------------------------------------------------------------------


@needs_transformers
def test_bert_convert_summary(capsys):
    model = bert()
    _, report = convert(model, k=0.1, exclude=["classifier"], report=True)
    print(report)
    linears = [n for n, m in bert().named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 14
    assert sorted(report.converted) == sorted(n for n in linears if n != "classifier")
    assert report.left_dense == {"classifier": "excluded (by 'classifier')"}
    assert type(model.classifier) is nn.Linear
    assert "13 layer(s) converted (13 Linear), 1 left dense" in capsys.readouterr().out


def bert_batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, VOCAB, (8, 12), generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(2)]


@needs_transformers
def test_bert_trains_next_to_its_dense_twin():
    dense = bert()
    for m in dense.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    converted = convert(copy.deepcopy(dense), k=0.1, exclude=["classifier"])
    assert_trains_next_to_dense(dense, converted, bert_batches(), cls_loss, steps=12)


@needs_transformers
def test_bert_gradient_checkpointing_gives_the_same_gradients():
    """transformers' activation checkpointing (gradient_checkpointing_enable before 5.x:
    torch.utils.checkpoint around each layer, the forward recomputed in the backward):
    the same meProp gradients."""
    model = bert()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    convert(model, k=0.1, exclude=["classifier"])
    model.train()
    batch = bert_batches()[0]
    grads = []
    for checkpointing in (False, True):
        ckpt = copy.deepcopy(model)
        if checkpointing:
            enable = getattr(ckpt, "activation_checkpointing_enable", None) or ckpt.gradient_checkpointing_enable
            enable()
        calls = []
        layer = ckpt.bert.encoder.layer[0].intermediate.dense
        layer.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
        cls_loss(ckpt, batch).backward()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in the backward
        grads.append({n: p.grad for n, p in ckpt.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)
    kept = grads[1]["bert.encoder.layer.0.intermediate.dense.weight"]
    assert int((kept != 0).any(1).sum()) == 13  # meProp's rows, not a dense gradient


@needs_transformers
def test_bert_compiles_in_one_graph():
    model = convert(bert(), k=0.1, exclude=["classifier"])
    model.eval()
    ids, labels = bert_batches()[0]
    eager = cls_loss(model, (ids, labels))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss = cls_loss(compiled, (ids, labels))
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    assert int((model.bert.encoder.layer[0].intermediate.dense.weight.grad != 0).any(1).sum()) == 13


@needs_transformers
def test_bert_save_pretrained_and_load_converted(tmp_path):
    model = convert(bert(), k=0.1, exclude=["classifier"])
    model.config.meprop = meprop_settings(model)
    model.save_pretrained(tmp_path)
    loaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path)
    assert not any(isinstance(m, MePropLinear) for m in loaded.modules())
    apply_settings(loaded, loaded.config.meprop)
    assert meprop_settings(loaded) == meprop_settings(model)
    assert type(loaded.classifier) is nn.Linear
    ids, _ = bert_batches()[0]
    model.eval(), loaded.eval()
    assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def _accelerate_skip():
    """transformers' Trainer needs accelerate (in the zoo extra); the reason where it is missing."""
    try:
        import accelerate  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure to import is a reason to skip
        return f"accelerate is not usable here (transformers' Trainer needs it; pip install -e '.[zoo]'): {type(e).__name__}: {e}"
    return None


@needs_transformers
@pytest.mark.skipif(_accelerate_skip() is not None, reason=_accelerate_skip() or "")
@pytest.mark.parametrize("options", [{}, {"gradient_accumulation_steps": 2, "bf16": True}],
                         ids=["plain", "accumulation-bf16"])
def test_bert_trains_under_transformers_trainer(tmp_path, options):
    """Trainer (AdamW, a learning-rate schedule, gradient clipping; with gradient
    accumulation and bf16 autocast) runs the meProp backward at every micro-batch: each
    converted layer's selection counters saw every token of every micro-batch, k units
    each, and only the converted layers' kept rows moved."""
    model = convert(bert(), k=0.25, exclude=["classifier"], track_selection=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    class Data(torch.utils.data.Dataset):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, VOCAB, (32, 12), generator=g)
        labels = torch.randint(0, 3, (32,), generator=g)

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.labels[i]}

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=2, max_grad_norm=1.0,
        learning_rate=1e-3, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1000,
        seed=0, **options,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Data())
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    assert trainer.model is model
    tokens = 2 * 32 * 12  # two epochs of 32 sequences of 12 tokens, every micro-batch
    layers = [m for m in model.modules() if isinstance(m, MePropLinear)]
    assert len(layers) == 13
    for layer in layers:
        stats = layer.selection_stats()
        assert stats.rows == (tokens if layer is not model.bert.pooler.dense else 2 * 32), stats.rows
        assert int(stats.hits.sum()) == stats.rows * layer.k_units  # unified top-k: k units per row
    # a converted layer's weight rows that were never kept did not move (AdamW, no weight decay)
    query = model.bert.encoder.layer[0].attention.self.query
    never = query.selection_stats().hits == 0
    moved = (query.weight.detach() != before["bert.encoder.layer.0.attention.self.query.weight"]).any(1)
    assert never.any() and not (moved & never).any()
    assert (model.classifier.weight.detach() != before["classifier.weight"]).all()


# --- timm ViT ------------------------------------------------------------------------


def vit_batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]


@needs_timm
def test_vit_convert_summary_trains_next_to_dense():
    dense = vit()
    converted, report = convert(copy.deepcopy(dense), k=0.1, exclude=["head"], report=True)
    print(report)
    linears = [n for n, m in dense.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(report.converted) == sorted(n for n in linears if n != "head")
    assert len(report.converted) == 8 and report.left_dense == {"head": "excluded (by 'head')"}
    assert_trains_next_to_dense(dense, converted, vit_batches(), vit_loss, steps=10)


@needs_timm
def test_vit_compiles_and_round_trips_through_state_dict_and_settings(tmp_path):
    model = convert(vit(), k=0.1, exclude=["head"])
    images, labels = vit_batches()[0]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    vit_loss(compiled, (images, labels)).backward()
    assert int((model.blocks[0].mlp.fc1.weight.grad != 0).any(1).sum()) == 39  # 10% of 384
    torch.save(model.state_dict(), tmp_path / "vit.pt")
    (tmp_path / "meprop.json").write_text(json.dumps(meprop_settings(model)))
    fresh = vit(seed=1)
    fresh.load_state_dict(torch.load(tmp_path / "vit.pt"))
    apply_settings(fresh, json.loads((tmp_path / "meprop.json").read_text()))
    assert meprop_settings(fresh) == meprop_settings(model)
    model.eval(), fresh.eval()
    assert torch.equal(model(images), fresh(images))


@needs_timm
def test_beit_qkv_used_through_f_linear_is_noted_and_the_model_trains():
    """timm's BEiT calls ``qkv`` without a q/v bias and computes ``F.linear(x,
    self.qkv.weight, qkv_bias)`` with one: convert converts qkv (it runs meProp in the
    first case) and its report notes the second, where the backward stays dense (the
    gradient shows it); the model trains next to its dense twin either way."""
    from timm.models.beit import Beit

    for qkv_bias, qkv_rows in ((True, 192), (False, 20)):
        torch.manual_seed(0)
        dense = Beit(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10, qkv_bias=qkv_bias)
        converted, report = convert(copy.deepcopy(dense), k=0.1, exclude=["head"], report=True)
        for block in ("blocks.0", "blocks.1"):
            assert type(converted.get_submodule(f"{block}.attn.qkv")).__name__ == "MePropLinear"
            assert "uses its weight without calling it" in report.notes[f"{block}.attn.qkv"]
        dense_losses, _ = assert_trains_next_to_dense(dense, converted, vit_batches(), vit_loss, steps=10)
        grad = converted.blocks[0].attn.qkv.weight.grad
        assert int((grad != 0).any(1).sum()) == qkv_rows, qkv_bias  # 10% of 192 rows is 20
