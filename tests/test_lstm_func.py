"""MePropLSTM under torch.func: ``functional_call`` uses the weights it is given, ``grad``
and ``vjp`` give the ordinary backward's gradients, and under ``vmap`` (per-sample
gradients, ``jacrev``, an ensemble, a vmapped forward back-propagated outside torch.func)
each vmapped entry is its own call, as a loop over the entries gives. Forward-mode and
grad of grad are refused by name.

Every comparison is exact (``torch.equal``): the transform runs the same code on the same
tensors as the loop it is compared with.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, stack_module_state, vjp, vmap

from meprop_triton import MePropLSTM

I, H, T = 5, 7, 4


def _lstm(k=2, **kw):
    torch.manual_seed(0)
    return MePropLSTM(I, H, k=k, **kw).double()


def _params(model):
    return {n: p.detach() for n, p in model.named_parameters()}


def _loss(model):
    def loss(params, x):
        out, (h, c) = functional_call(model, params, (x,))
        return out.pow(2).sum() + (h * c).sum()

    return loss


def _backward(model, x):
    """The ordinary backward's parameter gradients for input ``x``."""
    model.zero_grad()
    _loss(model)(dict(model.named_parameters()), x).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


CONFIGS = [
    dict(k=2),
    dict(k=7),
    dict(k=2, unified=False),
    dict(k=3, num_layers=2),
    dict(k=2, bidirectional=True),
    dict(k=2, batch_first=True),
]
IDS = ["k2", "dense-k", "per-example", "two-layers", "bidirectional", "batch-first"]


def test_functional_call_uses_the_weights_it_is_given():
    """It used the module's own weights: MePropLSTM read nn.LSTM's cached _flat_weights,
    which functional_call and parametrizations do not update (nn.LSTM refreshes the
    cache in its own forward)."""
    mp = _lstm(k=7)
    ref = nn.LSTM(I, H).double()
    ref.load_state_dict(mp.state_dict())
    gen = torch.Generator().manual_seed(3)
    params = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in mp.named_parameters()}
    x = torch.randn(T, 2, I, generator=gen, dtype=torch.double)
    out, (h, c) = functional_call(mp, params, (x,))
    r_out, (r_h, r_c) = functional_call(ref, params, (x,))
    torch.testing.assert_close((out, h, c), (r_out, r_h, r_c), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out, mp(x)[0])  # the given weights, not the module's

    # A parametrized weight (nn.utils.parametrize) is read as it is now.
    class Scale(nn.Module):
        def forward(self, w):
            return 0.5 * w

    for model in (mp, ref):
        nn.utils.parametrize.register_parametrization(model, "weight_hh_l0", Scale())
    torch.testing.assert_close(mp(x)[0], ref(x)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("B", [2, 3])
@pytest.mark.parametrize("kw", CONFIGS, ids=IDS)
def test_grad_and_vjp_give_the_ordinary_backwards_gradients(kw, B):
    """Also for x. (With batch_first, B = 2 or 3, the gradients differed in the last bits:
    F.linear takes another route for a non-contiguous input when the weight, unwrapped
    under torch.func, does not require grad.)"""
    mp = _lstm(**kw)
    x = torch.randn((B, T, I) if kw.get("batch_first") else (T, B, I), dtype=torch.double)
    expected = _backward(mp, x)
    x_ = x.clone().requires_grad_()
    _loss(mp)(dict(mp.named_parameters()), x_).backward()
    g_params, g_x = grad(_loss(mp), argnums=(0, 1))(_params(mp), x)
    _assert_equal(g_params, expected)
    assert torch.equal(g_x, x_.grad)
    _, fn = vjp(_loss(mp), _params(mp), x)
    g_params, g_x = fn(torch.ones((), dtype=torch.double))
    _assert_equal(g_params, expected)
    assert torch.equal(g_x, x_.grad)


@pytest.mark.parametrize("batched", [False, True], ids=["sequence", "batch-of-2"])
@pytest.mark.parametrize("kw", CONFIGS, ids=IDS)
def test_per_sample_gradients_are_each_samples_own(kw, batched):
    """vmap(grad(f)) over samples (each an unbatched (T, in) sequence, or a batch of 2
    sequences): sample i's gradients are what the ordinary backward gives for sample i
    alone."""
    mp = _lstm(**kw)
    shape = ((2, T) if kw.get("batch_first") else (T, 2)) if batched else (T,)
    xs = torch.randn(5, *shape, I, dtype=torch.double)
    per_sample = vmap(grad(_loss(mp)), in_dims=(None, 0))(_params(mp), xs)
    for i in range(len(xs)):
        _assert_equal({n: g[i] for n, g in per_sample.items()}, _backward(mp, xs[i]))


def test_jacrev_is_one_backward_per_output():
    """jacrev batches the backward over one-hot cotangents: each row of the Jacobian is
    the backward of that one output (which keeps its own units)."""
    mp = _lstm(k=2, bidirectional=True)
    x = torch.randn(3, 2, I, dtype=torch.double)

    def f(x):
        return mp(x)[0][-1]  # (2, 2H): the last step

    J = jacrev(f)(x)
    x_ = x.clone().requires_grad_()
    out = f(x_)
    for idx in [(0, 0), (0, 5), (1, 3), (1, 2 * H - 1)]:
        cot = torch.zeros_like(out)
        cot[idx] = 1.0
        (row,) = torch.autograd.grad(out, x_, cot, retain_graph=True)
        assert torch.equal(J[idx], row), idx


def test_an_ensemble_under_vmap_is_each_members_own():
    """vmap over stacked weights (torch.func.stack_module_state): member m's output and
    gradients are what member m alone gives."""
    members = [_lstm(k=2) for _ in range(3)]
    for m, model in enumerate(members):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + 0.1 * m)
    stacked, _ = stack_module_state(members)
    base = copy.deepcopy(members[0]).to("meta")
    x = torch.randn(T, 2, I, dtype=torch.double)
    grads = vmap(grad(_loss(base)), in_dims=(0, None))(stacked, x)
    outs = vmap(lambda p, x: functional_call(base, p, (x,))[0], in_dims=(0, None))(stacked, x)
    for m, model in enumerate(members):
        assert torch.equal(outs[m], model(x)[0])
        _assert_equal({n: g[m] for n, g in grads.items()}, _backward(model, x))


def test_a_vmapped_forward_back_propagated_outside_torch_func():
    """A vmapped forward whose weights require grad, then an ordinary .backward(): the
    gradient is the sum of the entries' own backwards."""
    mp = _lstm(k=2)
    xs = torch.randn(3, T, I, dtype=torch.double)
    vmap(lambda x: mp(x)[0])(xs).pow(2).sum().backward()
    got = {n: p.grad.clone() for n, p in mp.named_parameters()}
    expected = {n: torch.zeros_like(p) for n, p in mp.named_parameters()}
    for x in xs:
        mp.zero_grad()
        mp(x)[0].pow(2).sum().backward()
        for n, p in mp.named_parameters():
            expected[n] += p.grad
    # (autograd adds the entries' gradients in an order of its own: equal up to rounding)
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-14)


def test_random_selection_under_vmap():
    mp = _lstm(k=2, selection="random")
    xs = torch.randn(4, T, I, dtype=torch.double)
    f = grad(_loss(mp))
    with pytest.raises(RuntimeError, match="randomness='different'.*randomness='same'"):
        vmap(f, in_dims=(None, 0))(_params(mp), xs)

    torch.manual_seed(11)
    different = vmap(f, in_dims=(None, 0), randomness="different")(_params(mp), xs)
    torch.manual_seed(11)  # a loop over the samples drawing from the same generator
    for i, x in enumerate(xs):
        _assert_equal({n: g[i] for n, g in different.items()}, _backward(mp, x))

    torch.manual_seed(11)
    same = vmap(f, in_dims=(None, 0), randomness="same")(_params(mp), xs)
    after = torch.rand(1)
    for i, x in enumerate(xs):  # every sample with the one draw
        torch.manual_seed(11)
        _assert_equal({n: g[i] for n, g in same.items()}, _backward(mp, x))
    assert torch.equal(after, torch.rand(1))  # and the generator moved on as after one draw


def test_sparse_grad_under_vmap_is_refused_by_name_where_a_backward_is_vmapped():
    mp = _lstm(k=2, sparse_grad=True)
    xs = torch.randn(2, T, I, dtype=torch.double)
    with pytest.raises(NotImplementedError, match="sparse_grad=False"):
        vmap(grad(_loss(mp)), in_dims=(None, 0))(_params(mp), xs)
    with torch.no_grad():  # a vmapped inference runs
        out = vmap(lambda x: mp(x)[0])(xs)
        assert torch.equal(out, torch.stack([mp(x)[0] for x in xs]))


def test_vmap_over_no_entries_is_refused_clearly():
    mp = _lstm(k=2)
    with pytest.raises(ValueError, match="at least one vmapped entry; got a vmapped dimension of size 0"):
        vmap(grad(_loss(mp)), in_dims=(None, 0))(_params(mp), torch.randn(0, T, I, dtype=torch.double))


def test_forward_mode_and_grad_of_grad_are_refused_by_name():
    mp = _lstm(k=2)
    x = torch.randn(T, 2, I, dtype=torch.double)
    with pytest.raises(NotImplementedError, match="forward-mode differentiation .* of MePropLSTM"):
        jvp(lambda x: mp(x)[0], (x,), (torch.ones_like(x),))
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode differentiation .* of MePropLSTM"):
        mp(fwAD.make_dual(x, torch.ones_like(x)))

    def g_sum(params, x):
        return grad(_loss(mp))(params, x)["weight_hh_l0"].sum()

    with pytest.raises(NotImplementedError, match="MePropLSTM's backward cannot be differentiated"):
        grad(g_sum)(_params(mp), x)


def test_grad_over_packed_sequences():
    """Sequences of different lengths (a PackedSequence): grad gives the ordinary
    backward's gradients."""
    mp = _lstm(k=2, bidirectional=True)
    seqs = [torch.randn(n, I, dtype=torch.double) for n in (5, 3, 2)]
    packed = nn.utils.rnn.pack_sequence(seqs)

    def loss(params):
        out, (h, c) = functional_call(mp, params, (packed,))
        return out.data.pow(2).sum() + (h * c).sum()

    mp.zero_grad()
    loss(dict(mp.named_parameters())).backward()
    _assert_equal(grad(loss)(_params(mp)), {n: p.grad for n, p in mp.named_parameters()})
