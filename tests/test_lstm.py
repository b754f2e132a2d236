"""MePropLSTM: nn.LSTM's forward and (k >= H) gradients; the meProp definition for k < H."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from meprop_triton import MePropLSTM


def _lstm_pair(I=5, H=7, layers=1, bidirectional=False, batch_first=False, k=None, unified=True):
    torch.manual_seed(0)
    ref = nn.LSTM(I, H, layers, bidirectional=bidirectional, batch_first=batch_first).double()
    mp = MePropLSTM.from_lstm(ref, k=H if k is None else k, unified=unified)
    return ref, mp


def _grads(model, x, hx, g_out, g_h, g_c):
    out, (h, c) = model(x, hx)
    loss = (out * g_out).sum() + (h * g_h).sum() + (c * g_c).sum()
    inputs = [x, *(hx or ()), *model.parameters()]
    return (out, h, c), torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("hx", [False, True], ids=["zero-state", "h0c0"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, False), (1, True), (2, True)])
def test_dense_k_is_nn_lstm(layers, bidirectional, batch_first, hx):
    ref, mp = _lstm_pair(layers=layers, bidirectional=bidirectional, batch_first=batch_first)
    T, B, H, dirs = 6, 3, 7, 2 if bidirectional else 1
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((B, T, 5) if batch_first else (T, B, 5), generator=gen, dtype=torch.double, requires_grad=True)
    state = None
    if hx:
        state = tuple(torch.randn(layers * dirs, B, H, generator=gen, dtype=torch.double, requires_grad=True)
                      for _ in range(2))
    out_shape = (B, T, dirs * H) if batch_first else (T, B, dirs * H)
    g_out = torch.randn(out_shape, generator=gen, dtype=torch.double)
    g_h = torch.randn(layers * dirs, B, H, generator=gen, dtype=torch.double)
    g_c = torch.randn(layers * dirs, B, H, generator=gen, dtype=torch.double)
    (o1, h1, c1), want = _grads(ref, x, state, g_out, g_h, g_c)
    (o2, h2, c2), got = _grads(mp, x, state, g_out, g_h, g_c)
    for a, b in ((o1, o2), (h1, h2), (c1, c2)):  # the same forward (step by step when training)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_unbatched_input():
    ref, mp = _lstm_pair(layers=2, bidirectional=True)
    x = torch.randn(6, 5, dtype=torch.double, requires_grad=True)
    o1, (h1, c1) = ref(x)
    o2, (h2, c2) = mp(x)
    assert o2.shape == o1.shape == (6, 14) and h2.shape == (4, 7)
    for a, b in ((o1, o2), (h1, h2), (c1, c2)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    g1 = torch.autograd.grad(o1.square().sum(), [x, *ref.parameters()])
    g2 = torch.autograd.grad(o2.square().sum(), [x, *mp.parameters()])
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# --- the definition, step by step, as an independent oracle -------------------------


def _keep_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k largest entries of a 1-D score vector, ties to the lower index
    (a stable descending sort: independent of the package's selection code)."""
    order = sorted(range(scores.numel()), key=lambda j: (-float(scores[j]), j))[:k]
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[order] = True
    return mask


class _GateMask(torch.autograd.Function):
    """Identity forward; backward keeps, per gate, the top-k of the incoming gradient."""

    @staticmethod
    def forward(ctx, pre, k, H, unified):
        ctx.k, ctx.H, ctx.unified = k, H, unified
        return pre.clone()

    @staticmethod
    def backward(ctx, grad):
        k, H = ctx.k, ctx.H
        keep = torch.zeros_like(grad, dtype=torch.bool)
        for gate in range(4):
            cols = slice(gate * H, (gate + 1) * H)
            if ctx.unified:
                keep[:, cols] = _keep_topk(grad[:, cols].abs().sum(0), k)
            else:
                for b in range(grad.shape[0]):
                    keep[b, cols] = _keep_topk(grad[b, cols].abs(), k)
        return grad * keep, None, None, None


def _step_by_step(x, h0, c0, w_ih, w_hh, b_ih, b_hh, k, unified):
    """One layer over (T, B, in) with ordinary autograd, the gate pre-activations'
    gradients masked by the definition, the bias outside the mask (its gradient dense)."""
    H = w_hh.shape[1]
    h, c, outs = h0, c0, []
    for t in range(x.shape[0]):
        pre = x[t] @ w_ih.t() + h @ w_hh.t()
        a = _GateMask.apply(pre, k, H, unified) + b_ih + b_hh
        i, f, g, o = a.chunk(4, dim=1)
        c = f.sigmoid() * c + i.sigmoid() * g.tanh()
        h = o.sigmoid() * c.tanh()
        outs.append(h)
    return torch.stack(outs), h, c


@pytest.mark.parametrize("unified", [True, False], ids=["unified", "per-example"])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_sparse_k_matches_the_definition(k, unified):
    ref, mp = _lstm_pair(H=7, k=k, unified=unified)
    gen = torch.Generator().manual_seed(2)
    T, B = 6, 3
    x = torch.randn(T, B, 5, generator=gen, dtype=torch.double, requires_grad=True)
    h0 = torch.randn(1, B, 7, generator=gen, dtype=torch.double, requires_grad=True)
    c0 = torch.randn(1, B, 7, generator=gen, dtype=torch.double, requires_grad=True)
    g_out = torch.randn(T, B, 7, generator=gen, dtype=torch.double)
    out, (h, c) = mp(x, (h0, c0))
    got = torch.autograd.grad((out * g_out).sum() + h.sum(), [x, h0, c0, *mp.parameters()])
    params = list(ref.parameters())
    o2, h2, c2 = _step_by_step(x, h0[0], c0[0], *params, k, unified)
    want = torch.autograd.grad((o2 * g_out).sum() + h2.sum(), [x, h0, c0, *params])
    torch.testing.assert_close(out, o2, rtol=1e-10, atol=1e-12)
    for name, a, b in zip(["x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    # and they are not nn.LSTM's (the selection did something)
    o3, (h3, _) = ref(x, (h0, c0))
    dense = torch.autograd.grad((o3 * g_out).sum() + h3.sum(), params[0])[0]
    assert not torch.allclose(got[3], dense)


@pytest.mark.parametrize("unified", [True, False], ids=["unified", "per-example"])
def test_sparse_k_float32_matches_the_definition(unified):
    """fp32 (the selection on packed integer keys, not fp64's stable sort), batch of 1
    and of 3, against the fp32 step-by-step definition."""
    for B in (1, 3):
        torch.manual_seed(1)
        ref = nn.LSTM(5, 9, 1)
        mp = MePropLSTM.from_lstm(ref, k=2, unified=unified)
        gen = torch.Generator().manual_seed(3)
        T = 5
        x = torch.randn(T, B, 5, generator=gen, requires_grad=True)
        h0 = torch.randn(1, B, 9, generator=gen, requires_grad=True)
        c0 = torch.randn(1, B, 9, generator=gen, requires_grad=True)
        g_out = torch.randn(T, B, 9, generator=gen)
        out, (h, c) = mp(x, (h0, c0))
        got = torch.autograd.grad((out * g_out).sum() + h.sum(), [x, h0, c0, *mp.parameters()])
        params = list(ref.parameters())
        o2, h2, c2 = _step_by_step(x, h0[0], c0[0], *params, 2, unified)
        want = torch.autograd.grad((o2 * g_out).sum() + h2.sum(), [x, h0, c0, *params])
        for name, a, b in zip(["x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh"], got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"B={B} {name}")


def _select_oracle(scores: torch.Tensor, k: int) -> set:
    """Per row of a 2-D score tensor, the k largest (NaN and inf as +inf, ties to the
    lower index), as a set of (row, column) pairs: plain Python sorting."""
    kept = set()
    for r in range(scores.shape[0]):
        key = [float("inf") if (v != v or v == float("inf")) else float(v) for v in scores[r].tolist()]
        kept.update((r, j) for j in sorted(range(len(key)), key=lambda j: (-key[j], j))[:k])
    return kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("unified", [True, False], ids=["unified", "per-example"])
@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("k", [1, 3])
def test_gate_selection_ties_nan_inf(dtype, unified, B, k):
    """The backward's per-gate selection against plain sorting: ties (values repeated on
    purpose), NaN, +-inf and negative zero, every gate its own top-k."""
    from types import SimpleNamespace

    from meprop_triton.recurrent import _select

    H = 11
    gen = torch.Generator().manual_seed(7)
    da = torch.randint(-3, 4, (B, 4, H), generator=gen).to(dtype) / 2  # many ties
    da[0, 0, 8] = float("nan")  # NaN and inf tie: the lower index, 5, first
    da[0, 0, 5] = float("inf")
    da[-1, 1, 2] = float("inf")
    da[0, 1, 9] = float("-inf")
    da[0, 2, :] = -0.0
    ctx = SimpleNamespace(selection="topk", unified=unified, generator=None)
    rev = torch.arange(H - 1, -1, -1)
    got = _select(da, k, ctx, rev)
    assert got.shape == (1 if unified else B, 4, k)
    if unified:
        scores = da.double().abs().sum(0, keepdim=True)
    else:
        scores = da.double().abs()
    want = _select_oracle(scores.reshape(-1, H), k)
    rows = got.reshape(-1, k)
    assert {(r, int(j)) for r in range(rows.shape[0]) for j in rows[r]} == want


def test_two_layers_bidirectional_sparse_matches_the_definition():
    ref, mp = _lstm_pair(H=6, layers=2, bidirectional=True, k=2)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 2, 5, generator=gen, dtype=torch.double, requires_grad=True)
    out, _ = mp(x)
    g = torch.randn(out.shape, generator=gen, dtype=torch.double)
    got = torch.autograd.grad((out * g).sum(), [x, *mp.parameters()])
    P = dict(ref.named_parameters())
    zeros = torch.zeros(2, 6, dtype=torch.double)
    layer_in = x
    for layer in range(2):
        outs = []
        for d, sfx in enumerate(("", "_reverse")):
            names = [f"{w}_l{layer}{sfx}" for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            seq = layer_in.flip(0) if d else layer_in
            o, _, _ = _step_by_step(seq, zeros, zeros, *(P[n] for n in names), 2, True)
            outs.append(o.flip(0) if d else o)
        layer_in = torch.cat(outs, 2)
    torch.testing.assert_close(out, layer_in, rtol=1e-10, atol=1e-12)
    want = torch.autograd.grad((layer_in * g).sum(), [x, *ref.parameters()])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_from_lstm_shares_parameters_and_state_dict_both_ways():
    ref, mp = _lstm_pair(layers=2, bidirectional=True, k=3)
    assert all(a is b for a, b in zip(ref.parameters(), mp.parameters()))
    assert list(mp.state_dict()) == list(ref.state_dict())
    fresh = MePropLSTM(5, 7, 2, bidirectional=True, k=0.5).double()
    fresh.load_state_dict(ref.state_dict())
    plain = nn.LSTM(5, 7, 2, bidirectional=True).double()
    plain.load_state_dict(fresh.state_dict())
    x = torch.randn(4, 2, 5, dtype=torch.double)
    torch.testing.assert_close(plain(x)[0], fresh(x)[0], rtol=1e-12, atol=1e-14)
    with torch.no_grad():  # no backward to come: torch's fused LSTM, bit for bit
        assert torch.equal(plain(x)[0], fresh(x)[0])
    assert "k=0.5" in repr(fresh) and fresh.k_units == 4


def test_bad_arguments():
    with pytest.raises(ValueError, match="k"):
        MePropLSTM(5, 7, k=0)
    with pytest.raises(ValueError, match="selection"):
        MePropLSTM(5, 7, k=2, selection="best")
    with pytest.raises(NotImplementedError, match="proj_size"):
        MePropLSTM(5, 7, k=2, proj_size=3)
    lstm = MePropLSTM(5, 7, k=2)
    with pytest.raises(ValueError, match="k"):
        lstm.k = -1
    assert lstm.k == 2
    with pytest.raises(ValueError, match="input_size=5"):
        lstm(torch.randn(3, 2, 4))
    with pytest.raises(ValueError, match=r"\(h0, c0\) must each have shape \(1, 2, 7\)"):
        lstm(torch.randn(3, 2, 5), (torch.zeros(1, 3, 7), torch.zeros(1, 3, 7)))
    packed = nn.utils.rnn.pack_sequence([torch.randn(3, 4), torch.randn(2, 4)])
    with pytest.raises(ValueError, match="input_size=5"):
        lstm(packed)
    with pytest.raises(TypeError, match="nn.LSTM"):
        MePropLSTM.from_lstm(nn.GRU(5, 7), k=2)


@pytest.mark.parametrize("k", [7, 2], ids=["dense-k", "k2"])
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True)])
def test_packed_sequences(layers, bidirectional, k):
    """Variable-length sequences in one PackedSequence (unsorted, with (h0, c0)): the
    outputs are nn.LSTM's; k >= H gives its gradients; k < H equals the definition run
    on each sequence alone when the selection is per sequence."""
    torch.manual_seed(5)
    H, dirs = 7, 2 if bidirectional else 1
    ref = nn.LSTM(5, H, layers, bidirectional=bidirectional).double()
    mp = MePropLSTM.from_lstm(ref, k=k, unified=False)
    lengths = [4, 6, 2]
    seqs = [torch.randn(n, 5, dtype=torch.double, requires_grad=True) for n in lengths]
    h0 = torch.randn(layers * dirs, 3, H, dtype=torch.double, requires_grad=True)
    c0 = torch.randn(layers * dirs, 3, H, dtype=torch.double, requires_grad=True)
    packed = nn.utils.rnn.pack_sequence(seqs, enforce_sorted=False)
    outs = {}
    for name, model in (("ref", ref), ("mp", mp)):
        out, (h, c) = model(packed, (h0, c0))
        padded, _ = nn.utils.rnn.pad_packed_sequence(out)
        outs[name] = (padded, h, c)
    for a, b in zip(outs["ref"], outs["mp"]):
        assert torch.equal(a, b)
    gen = torch.Generator().manual_seed(6)
    g = torch.randn(outs["mp"][0].shape, generator=gen, dtype=torch.double)
    gh = torch.randn(h0.shape, generator=gen, dtype=torch.double)
    inputs = [*seqs, h0, c0, *ref.parameters()]
    got = torch.autograd.grad((outs["mp"][0] * g).sum() + (outs["mp"][1] * gh).sum(), inputs, retain_graph=True)
    if k >= H:
        want = torch.autograd.grad((outs["ref"][0] * g).sum() + (outs["ref"][1] * gh).sum(), inputs)
    else:  # per sequence: each sequence alone through the same model, gradients summed
        loss = 0
        for b, seq in enumerate(seqs):
            o, (h, _) = mp(seq.unsqueeze(1), (h0[:, b : b + 1], c0[:, b : b + 1]))
            loss = loss + (o.squeeze(1) * g[: lengths[b], b]).sum() + (h.squeeze(1) * gh[:, b]).sum()
        want = torch.autograd.grad(loss, inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [7, 2], ids=["dense-k", "k2"])
@pytest.mark.parametrize("unified", [True, False], ids=["unified", "per-example"])
def test_packed_sequences_of_one_length_are_the_plain_batch(k, unified):
    """A PackedSequence whose sequences are all as long (one sentence a step is one): the
    same outputs and gradients as the (T, B) tensor it packs, exactly."""
    torch.manual_seed(8)
    mp = MePropLSTM(5, 7, k=k, unified=unified, bidirectional=True).double()
    for B in (1, 3):
        x = torch.randn(6, B, 5, dtype=torch.double, requires_grad=True)
        g = torch.randn(6, B, 14, dtype=torch.double)
        out, _ = mp(x)
        want = torch.autograd.grad((out * g).sum(), [x, *mp.parameters()])
        packed = nn.utils.rnn.pack_padded_sequence(x, [6] * B)
        out_p, _ = mp(packed)
        assert torch.equal(out_p.data, out.reshape(-1, 14))
        got = torch.autograd.grad((out_p.data * g.reshape(-1, 14)).sum(), [x, *mp.parameters()])
        for a, b in zip(got, want):
            assert torch.equal(a, b)


@pytest.mark.parametrize("k", [7, 3], ids=["dense-k", "k3"])
@pytest.mark.parametrize("unified", [True, False], ids=["unified", "per-example"])
def test_kept_gates_equal_recomputed_ones(k, unified):
    """The training forward keeps the gates for the backward; without it (keep_gates
    False: torch's fused forward, the gates recomputed in the backward) the outputs and
    gradients are the same (fp64), in the Function eager calls take and in the one
    torch.func transforms take."""
    from meprop_triton.recurrent import _EagerLSTMLayer, _LSTMLayer

    torch.manual_seed(9)
    ref = nn.LSTM(5, 7, bidirectional=True).double()
    params = list(ref.parameters())
    x = torch.randn(6, 3, 5, dtype=torch.double, requires_grad=True)
    h0 = torch.randn(2, 3, 7, dtype=torch.double, requires_grad=True)
    c0 = torch.randn(2, 3, 7, dtype=torch.double, requires_grad=True)
    gen = torch.Generator().manual_seed(10)
    g = torch.randn(6, 3, 14, generator=gen, dtype=torch.double)
    gh = torch.randn(2, 3, 7, generator=gen, dtype=torch.double)
    results = []
    for keep, function in ((True, _EagerLSTMLayer), (False, _EagerLSTMLayer), (True, _LSTMLayer), (False, _LSTMLayer)):
        out, h, c, *_ = function.apply(x, h0, c0, None, k, unified, "topk", None, True, True, keep, False, *params)
        grads = torch.autograd.grad((out * g).sum() + (h * gh).sum() + c.sum(), [x, h0, c0, *params])
        results.append((out, h, c, *grads))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_convert_swaps_lstms_only_when_asked():
    from meprop_triton import MePropLinear, convert

    torch.manual_seed(0)

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(5, 7, batch_first=True)
            self.out = nn.Linear(7, 3)

        def forward(self, x):
            return self.out(self.lstm(x)[0])

    plain = convert(Tagger(), k=2)
    assert type(plain.lstm) is nn.LSTM and isinstance(plain.out, MePropLinear)
    model = Tagger()
    weights = list(model.lstm.parameters())
    model = convert(model, k=2, lstm=True, exclude=["out"], unified=False, sparse_grad=True)
    assert isinstance(model.lstm, MePropLSTM) and type(model.out) is nn.Linear
    assert model.lstm.k == 2 and not model.lstm.unified and model.lstm.batch_first
    assert all(a is b for a, b in zip(model.lstm.parameters(), weights))
    model(torch.randn(2, 4, 5)).sum().backward()
    with pytest.raises(TypeError, match="lstm must be True or False"):
        convert(Tagger(), k=2, lstm="yes")
    assert isinstance(convert(nn.LSTM(3, 4), k=1, lstm=True), MePropLSTM)


@pytest.mark.parametrize("unified", [True, False], ids=["unified", "per-example"])
@pytest.mark.parametrize("k", [2, 7], ids=["k2", "dense-k"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_batch_trains_as_nn_lstm_does(k, unified, dtype):
    ref, mp = _lstm_pair(k=k, unified=unified)
    ref.to(dtype)
    x = torch.randn(4, 0, 5, dtype=dtype, requires_grad=True)
    for model in (ref, mp):
        out, (h, c) = model(x)
        assert out.shape == (4, 0, 7) and h.shape == c.shape == (1, 0, 7)
        (out.sum() + h.sum() + c.sum()).backward()
    for p_ref, p_mp in zip(ref.parameters(), mp.parameters()):  # shared: the two backwards add up
        assert p_mp.grad is p_ref.grad and torch.equal(p_ref.grad, torch.zeros_like(p_ref.grad))
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_a_sequence_of_no_steps_is_refused_at_the_call(grad):
    lstm = MePropLSTM(5, 7, k=2)
    with torch.set_grad_enabled(grad), pytest.raises(ValueError, match=r"at least one step; got input of shape \(0, 3, 5\)"):
        lstm(torch.randn(0, 3, 5))


def test_bad_dtypes_and_states_are_named():
    lstm = MePropLSTM(5, 7, k=2)
    x = torch.randn(3, 2, 5)
    zeros = torch.zeros(1, 2, 7)
    with pytest.raises(TypeError, match=r"input has dtype torch.float64 but this MePropLSTM's parameters are torch.float32"):
        lstm(x.double())
    with pytest.raises(TypeError, match=r"needs a floating-point input; got dtype torch.int64"):
        lstm(x.long())
    with pytest.raises(TypeError, match=r"h0 and c0 must have the input's dtype torch.float32; got torch.float32 and torch.float64"):
        lstm(x, (zeros, zeros.double()))
    with pytest.raises(TypeError, match=r"hx must be a tuple \(h0, c0\) of two tensors, as for nn.LSTM; got a tensor of shape \(2, 1, 2, 7\)"):
        lstm(x, torch.stack([zeros, zeros]))
    with pytest.raises(TypeError, match=r"MePropLSTM needs dense \(strided\) tensors; input has layout torch.sparse_coo"):
        lstm(x.to_sparse())
    packed = nn.utils.rnn.pack_sequence([torch.randn(3, 5), torch.randn(2, 5)])
    with pytest.raises(TypeError, match=r"h0 and c0 must have the input's dtype"):
        lstm(packed, (zeros, zeros.half()))
    assert all(p.grad is None for p in lstm.parameters())


def test_k_messages_speak_of_hidden_size_and_proj_size_is_named():
    with pytest.raises(ValueError, match=r"a float k is a fraction of hidden_size"):
        MePropLSTM(5, 7, k=1.5)
    with pytest.raises(NotImplementedError, match=r"proj_size > 0 yet; got proj_size=3"):
        MePropLSTM(5, 7, k=2, proj_size=3)
    with pytest.raises(ValueError, match=r"proj_size should be a positive integer or zero"):  # nn.LSTM's own
        MePropLSTM(5, 7, k=2, proj_size=-1)


@pytest.mark.parametrize("k", [2, 7], ids=["k2", "dense-k"])
def test_runs_under_cpu_autocast_as_nn_lstm_does(k):
    """Autocast runs nn.LSTM in bfloat16 on the CPU; MePropLSTM casts as it does."""
    torch.manual_seed(0)
    ref = nn.LSTM(5, 7, 2)
    mp = MePropLSTM(5, 7, 2, k=k)
    mp.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ref, (h_ref, _) = ref(x)
        out, (h, c) = mp(x)
    assert out.dtype == h.dtype == c.dtype == out_ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, out_ref, atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and mp.weight_ih_l0.grad.dtype == torch.float32
    if k == 7:  # dense k: nn.LSTM's gradient, up to bfloat16 rounding
        grads = [p.grad.clone() for p in mp.parameters()]
        mp.zero_grad()
        ref.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref(x)[0].float().sum().backward()
        for g, p in zip(grads, ref.parameters()):
            torch.testing.assert_close(g, p.grad, atol=5e-2, rtol=5e-2)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
@pytest.mark.parametrize("k", [2, 7], ids=["k2", "dense-k"])
def test_a_backward_to_be_differentiated_is_refused_by_name(k):
    """create_graph=True (a gradient penalty) crashed inside the backward on its out=
    operations; it is refused, and no gradient is written."""
    lstm = MePropLSTM(5, 7, k=k)
    x = torch.randn(3, 2, 5, requires_grad=True)
    with pytest.raises(NotImplementedError, match=r"MePropLSTM's backward cannot be differentiated \(create_graph=True"):
        torch.autograd.grad(lstm(x)[0].sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="create_graph=True"):
        lstm(x)[0].sum().backward(create_graph=True)
    assert x.grad is None and all(p.grad is None for p in lstm.parameters())


def test_sparse_grad_under_autocast_is_refused_before_any_work():
    torch.manual_seed(0)
    lstm = MePropLSTM(5, 7, k=2, sparse_grad=True)
    head = nn.Linear(7, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="sparse_grad=True cannot run under torch.autocast"):
        head(lstm(torch.randn(4, 3, 5))[0]).float().sum().backward()
    assert all(p.grad is None for p in [*lstm.parameters(), *head.parameters()])
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert lstm(torch.randn(4, 3, 5))[0].dtype == torch.bfloat16  # no backward: runs


def test_proj_size_as_a_numpy_int_is_refused_too():
    import numpy as np

    with pytest.raises(NotImplementedError, match=r"proj_size > 0 yet; got proj_size=2"):
        MePropLSTM(5, 7, k=2, proj_size=np.int64(2))
