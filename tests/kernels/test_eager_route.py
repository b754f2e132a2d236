"""The eager route of the Triton ops (``triton_ops.call_op``): in plain eager mode a
public op function runs its op's body directly, skipping the dispatcher's round trip;
anything that could see the op as one (a ``TorchDispatchMode``, tensor subclasses,
compilation) gets the op itself. Both routes give the same tensors, bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernel_checks import randn
from meprop_triton import reference

pytestmark = pytest.mark.interpreter


class _OpNames(TorchDispatchMode):
    """Records the name of every op that reaches the Python dispatcher."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _cases(rng, device):
    from meprop_triton import triton_ops as T

    M, N, I, k = 7, 130, 64, 9
    G = randn((M, N), torch.float32, rng, device)
    X, W = randn((M, I), torch.float32, rng, device), randn((N, I), torch.float32, rng, device)
    idx_pe = reference.per_example_random_indices(M, N, k, generator=rng).to(device)
    idx_u = reference.random_indices(N, k, generator=rng).to(device)
    return [
        ("unified_topk_backward", lambda: T.unified_topk_backward(G, X, W, k, return_indices=True),
         (G, X, W, k, True, True, True)),
        ("per_example_topk_backward", lambda: T.per_example_topk_backward(G, X, W, k, return_indices=True),
         (G, X, W, k, True, True, True)),
        ("per_example_backward_from_indices", lambda: T.per_example_backward_from_indices(G, X, W, idx_pe),
         (G, X, W, idx_pe, True, True, True)),
        ("unified_backward_from_indices", lambda: T.unified_backward_from_indices(G, X, W, idx_u),
         (G, X, W, idx_u, True, True, True)),
    ]


@pytest.mark.parametrize("which", range(4), ids=["unified", "per_example", "per_example_idx", "unified_idx"])
def test_direct_route_equals_the_op(which, rng, device):
    name, public, op_args = _cases(rng, device)[which]
    direct = public()
    via_op = getattr(torch.ops.meprop_triton, name)(*op_args)
    assert len(direct) == len(via_op)
    for a, b in zip(direct, via_op):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_a_dispatch_mode_sees_the_op(rng, device):
    """A ``TorchDispatchMode`` (FlopCounterMode, a debug or fake mode) is handed the op as
    one call, as before the eager route existed; plain eager runs the body."""
    for name, public, _ in _cases(rng, device):
        with _OpNames() as mode:
            public()
        assert f"meprop_triton.{name}" in mode.names, (name, mode.names)


def test_the_profiler_shows_the_op(rng, device):
    cases = _cases(rng, device)
    with torch.autograd.profiler.profile() as prof:
        for _, public, _ in cases:
            public()
    names = {e.name for e in prof.function_events}
    for name, _, _ in cases:
        assert f"meprop_triton::{name}" in names, name


def test_module_backward_takes_the_direct_route(rng, device, monkeypatch):
    """A MePropLinear backward on the Triton backend (its saved weight comes back as a
    Parameter, grad mode off) runs the body directly, and gives the op route's
    gradients bit for bit."""
    from meprop_triton import MePropLinear, triton_ops

    ran = []
    real = triton_ops._unified_topk_backward

    def body(*args):
        ran.append(torch.is_grad_enabled())
        return real(*args)

    monkeypatch.setattr(triton_ops, "_unified_topk_backward", body)
    torch.manual_seed(0)
    layer = MePropLinear(64, 130, k=9, backend="triton").to(device)
    x = randn((7, 64), torch.float32, rng, device).requires_grad_()
    layer(x).square().sum().backward()
    assert ran == [False]  # the direct route, under the backward's no-grad mode
    direct = (x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone())

    monkeypatch.setattr(triton_ops, "_set_wrap_triton_enabled", None)  # forces the op route
    ran.clear()
    x.grad = layer.weight.grad = layer.bias.grad = None
    layer(x).square().sum().backward()
    assert ran == []
    for a, b in zip(direct, (x.grad, layer.weight.grad, layer.bias.grad)):
        assert torch.equal(a, b)


def test_plain_eager_runs_the_body_without_the_dispatcher(rng, device, monkeypatch):
    """The op's registered function is the original body; the public function passes the
    module's current one. So a wrapper patched over the module's body runs only when the
    public function calls the body itself: in plain eager, not under a dispatch mode."""
    from meprop_triton import triton_ops as T

    bodies = {
        "unified_topk_backward": "_unified_topk_backward",
        "per_example_topk_backward": "_per_example_topk_backward",
        "per_example_backward_from_indices": "_per_example_backward_from_indices",
        "unified_backward_from_indices": "_unified_backward_from_indices",
    }
    ran = []
    for name, attr in bodies.items():
        real = getattr(T, attr)

        def wrapper(*args, _real=real, _name=name):
            ran.append(_name)
            return _real(*args)

        monkeypatch.setattr(T, attr, wrapper)
    for name, public, _ in _cases(rng, device):
        ran.clear()
        public()
        assert ran == [name]
        ran.clear()
        with _OpNames():
            public()
        assert ran == []


def test_what_the_op_route_keeps(rng, device, monkeypatch):
    """The op itself is called where running its body would differ: grad mode with an
    input that requires grad (the op records no history), a TorchFunctionMode such as
    ``with torch.device(...)``, and meta tensors (the op's fake gives the shapes)."""
    from meprop_triton import triton_ops as T

    ran = []
    real = T._unified_topk_backward
    monkeypatch.setattr(T, "_unified_topk_backward", lambda *a: ran.append(1) or real(*a))
    G = randn((7, 130), torch.float32, rng, device)
    X, W = randn((7, 64), torch.float32, rng, device), randn((130, 64), torch.float32, rng, device)

    gx, gw, gb = T.unified_topk_backward(G.requires_grad_(), X, W, 9)
    assert ran == []
    with pytest.raises(RuntimeError):  # no autograd formula: refused, not silently partial
        (gx.sum() + gb.sum()).backward()
    G.requires_grad_(False)
    with torch.no_grad():
        T.unified_topk_backward(G.detach().requires_grad_(), X, W, 9)
    assert ran == [1]  # no grad mode: direct

    ran.clear()
    with torch.device(device):
        T.unified_topk_backward(G, X, W, 9)
    assert ran == []

    if T.INTERPRETED:  # compiled kernels refuse meta tensors before either route
        meta = [t.to("meta") for t in (G, X, W)]
        gx, gw, gb = T.unified_topk_backward(*meta, 9)
        assert ran == [] and gx.is_meta and gx.shape == (7, 64) and gw.shape == (130, 64) and gb.shape == (130,)
