"""End to end: a small Transformer classifier trained dense and with meProp.

Task (synthetic, fixed seed): sequences of 16 tokens over a vocabulary of 12. Tokens
0 ("A") and 1 ("B") are each present (1 or 2 copies) or absent at random; the label is
``[A present] XOR [B present]``. Mean-pooled embeddings cannot solve it (the label is not
a linear function of the token counts), so the encoder layers, whose feed-forward
linears are the ones converted to meProp, must do the work.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meprop_triton import MePropLinear, convert

VOCAB, SEQ_LEN, D_MODEL, N_LAYERS = 12, 16, 32, 2
N_TRAIN, N_TEST, BATCH, EPOCHS, LR = 2000, 1000, 50, 4, 2e-3


def make_data(n: int, gen: torch.Generator):
    x = torch.randint(2, VOCAB, (n, SEQ_LEN), generator=gen)
    a = torch.randint(0, 2, (n,), generator=gen)
    b = torch.randint(0, 2, (n,), generator=gen)
    for i in range(n):
        pos = torch.randperm(SEQ_LEN, generator=gen)[:4]
        na, nb = torch.randint(1, 3, (2,), generator=gen).tolist()
        if a[i]:
            x[i, pos[:na]] = 0
        if b[i]:
            x[i, pos[2 : 2 + nb]] = 1
    return x, a ^ b


class Classifier(nn.Module):
    def __init__(self, n_classes: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        self.pos = nn.Parameter(0.02 * torch.randn(SEQ_LEN, D_MODEL))
        layer = nn.TransformerEncoderLayer(
            D_MODEL, nhead=4, dim_feedforward=4 * D_MODEL, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=N_LAYERS, enable_nested_tensor=False)
        self.classifier = nn.Linear(D_MODEL, n_classes)

    def forward(self, tokens):
        return self.classifier(self.encoder(self.embed(tokens) + self.pos).mean(dim=1))


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def train(model, x, y, on_first_backward=None):
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    order = torch.Generator().manual_seed(1)  # the same data order for both runs
    for _ in range(EPOCHS):
        perm = torch.randperm(len(x), generator=order)
        for start in range(0, len(x), BATCH):
            idx = perm[start : start + BATCH]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            if on_first_backward is not None:
                on_first_backward(model)
                on_first_backward = None
            opt.step()


@pytest.fixture
def one_thread():
    """Tiny GEMMs: a second OpenMP thread only adds synchronisation, and makes run time
    erratic when the two cores are shared with other work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_transformer_classifier_meprop_matches_dense(one_thread):
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    x_train, y_train = make_data(N_TRAIN, gen)
    x_test, y_test = make_data(N_TEST, gen)
    assert 0.4 < y_test.float().mean() < 0.6

    torch.manual_seed(0)
    dense = Classifier()
    meprop = convert(copy.deepcopy(dense), k=0.25, exclude=["classifier"])

    # The twin really is converted: the encoder's feed-forward linears, nothing else.
    converted = sorted(n for n, m in meprop.named_modules() if isinstance(m, MePropLinear))
    assert converted == [f"encoder.layers.{i}.linear{j}" for i in range(N_LAYERS) for j in (1, 2)]
    assert type(meprop.classifier) is nn.Linear
    for i in range(N_LAYERS):
        assert not isinstance(meprop.encoder.layers[i].self_attn.out_proj, MePropLinear)
    assert meprop.encoder.layers[0].linear1.k_units == D_MODEL  # 25% of 4*D_MODEL
    assert meprop.encoder.layers[0].linear2.k_units == D_MODEL // 4

    def check_sparse_rows(model):
        for i in range(N_LAYERS):
            layer = model.encoder.layers[i]
            for lin in (layer.linear1, layer.linear2):
                assert int((lin.weight.grad != 0).any(1).sum()) == lin.k_units
        assert bool((model.classifier.weight.grad != 0).all())  # trained densely

    chance = 0.5
    assert accuracy(dense, x_test, y_test) < 0.7  # not solved before training

    train(dense, x_train, y_train)
    train(meprop, x_train, y_train, on_first_backward=check_sparse_rows)
    acc_dense = accuracy(dense, x_test, y_test)
    acc_meprop = accuracy(meprop, x_test, y_test)
    print(f"test accuracy: dense {acc_dense:.3f}, meProp k=25% {acc_meprop:.3f}")

    assert acc_dense >= 0.90
    assert acc_meprop >= chance + 0.35
    assert abs(acc_meprop - acc_dense) <= 0.05
    # meProp changed the training (same init, same data order, different updates).
    assert not torch.equal(
        meprop.encoder.layers[0].linear1.weight, dense.encoder.layers[0].linear1.weight
    )

    # The trained meProp model's state_dict loads (strict) into the plain architecture.
    plain = Classifier()
    plain.load_state_dict(meprop.state_dict(), strict=True)
    assert not any(isinstance(m, MePropLinear) for m in plain.modules())
    plain.eval()
    meprop.eval()
    with torch.no_grad():
        assert torch.equal(plain(x_test), meprop(x_test))
    assert torch.equal(plain(x_test[:64]), meprop(x_test[:64]))  # grad mode: regular path
    assert accuracy(plain, x_test, y_test) == acc_meprop

    elapsed = time.perf_counter() - t0
    print(f"training test took {elapsed:.1f} s")
