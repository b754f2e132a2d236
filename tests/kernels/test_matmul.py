"""kernels/matmul.py against reference.unified_backward (and an fp64 statement of it)."""

from __future__ import annotations

import math

import pytest
import torch

from kernel_checks import (
    DTYPE_IDS,
    DTYPES,
    assert_reduction_close,
    poisoned,
    randn,
    skip_unsupported,
    strided_copy,
    tf32_round,
)
from meprop_triton import reference

pytestmark = pytest.mark.interpreter

# (M, out, in): every combination of M in {1, 7, 37}, out in {1, 5, 130, 1000} and
# in in {3, 64, 129}, plus one shape with several tiles in every direction of the test
# config.
SHAPES = [(m, o, i) for m in (1, 7, 37) for o in (1, 5, 130, 1000) for i in (3, 64, 129)] + [(70, 300, 130)]
SHAPE_IDS = [f"M{m}_out{o}_in{i}" for m, o, i in SHAPES]


def k_values(n_out: int) -> list[int]:
    return sorted({1, max(1, n_out - 1), n_out})


MODES = ["gather", "compact"]  # G's columns gathered in the GEMM loads / compacted first


def compacted(G, idx):
    """``G[:, idx]`` through the gather kernel, into a NaN-poisoned buffer."""
    from meprop_triton.kernels.matmul import gather_columns

    out = poisoned((G.shape[0], idx.shape[0]), G.dtype, G.device)
    res = gather_columns(G, idx, out=out)
    assert res is out
    return res


def gx(G, W, idx, config=None, out=None, mode="gather"):
    from meprop_triton.kernels.matmul import gathered_grad_input

    if out is None:
        out = poisoned((G.shape[0], W.shape[1]), G.dtype, G.device)
    g_sel = compacted(G, idx) if mode == "compact" else None
    res = gathered_grad_input(G, W, idx, grad_selected=g_sel, out=out, config=config)
    assert res is out
    return res


def gw(G, X, idx, rest="compute", config=None, out=None, mode="gather"):
    from meprop_triton.kernels.matmul import complement, scattered_grad_weight

    if out is None:
        out = poisoned((G.shape[1], X.shape[1]), G.dtype, G.device)
    if isinstance(rest, str):
        rest = complement(idx, G.shape[1])
    g_sel = compacted(G, idx) if mode == "compact" else None
    res = scattered_grad_weight(G, X, idx, rest, grad_selected=g_sel, out=out, config=config)
    assert res is out
    return res


def exact(G, X, W, idx):
    """fp64 ``(grad_x, grad_W)`` and the same products of absolute values (the bounds)."""
    d = lambda t: t.detach().to(torch.float64).cpu()  # noqa: E731
    G, X, W, idx = d(G), d(X), d(W), idx.cpu()
    rx, rw, _ = reference.unified_backward(G, X, W, idx, need_bias=False)
    bx, bw, _ = reference.unified_backward(G.abs(), X.abs(), W.abs(), idx, need_bias=False)
    return rx, rw, bx, bw


def check_both(G, X, W, idx, config=None, mode="gather"):
    K, M = idx.shape[0], G.shape[0]
    rx, rw, bx, bw = exact(G, X, W, idx)
    r = tf32_round(G.dtype)
    assert_reduction_close(gx(G, W, idx, config, mode=mode), rx, bx, K, in_round=r, what=f"grad_x ({mode})")
    assert_reduction_close(gw(G, X, idx, config=config, mode=mode), rw, bw, M, in_round=r, what=f"grad_W ({mode})")


def random_idx(n_out, k, rng, device):
    return torch.randperm(n_out, generator=rng)[:k].sort().values.to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M,N,I", SHAPES, ids=SHAPE_IDS)
def test_products_match_reference(M, N, I, dtype, rng, device):
    skip_unsupported(dtype)
    G = randn((M, N), dtype, rng, device)
    X = randn((M, I), dtype, rng, device)
    W = randn((N, I), dtype, rng, device)
    for i, k in enumerate(k_values(N)):
        # both ways of reading G[:, S], alternating over the k values and shapes
        mode = MODES[(i + M + N + I) % 2]
        check_both(G, X, W, random_idx(N, k, rng, device), mode=mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_both_modes_odd_shape(dtype, mode, rng, device):
    skip_unsupported(dtype)
    M, N, I = 37, 130, 129
    G = randn((M, N), dtype, rng, device)
    X = randn((M, I), dtype, rng, device)
    W = randn((N, I), dtype, rng, device)
    for k in (1, 17, 129, 130):
        check_both(G, X, W, random_idx(N, k, rng, device), mode=mode)


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "padded", "expanded"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gather_columns(layout, dtype, rng, device):
    """G[:, idx] exactly, from any layout of G, NaN and inf included."""
    G = randn((37, 130), dtype, rng, device)
    G[3, 5] = math.nan
    G[4, 7] = -math.inf
    G = strided_copy(G, layout)
    for idx in (torch.tensor([0], device=device), random_idx(130, 60, rng, device), torch.arange(130, device=device)):
        got = compacted(G, idx)
        assert torch.equal(got.isnan(), G[:, idx].isnan())
        assert torch.equal(got.nan_to_num(), G[:, idx].nan_to_num())


@pytest.mark.parametrize("copy_inner", [True, False], ids=["copy_non_unit_inner", "kernel_strides"])
@pytest.mark.parametrize("layout", ["transposed", "padded", "expanded"])
def test_strided_operands(layout, copy_inner, rng, device, monkeypatch):
    """Any strides: through the launcher's contiguous copy of a non-unit inner stride
    (the default) and straight through the kernels' general-stride code."""
    from meprop_triton.kernels import matmul

    monkeypatch.setattr(matmul, "COPY_NON_UNIT_INNER", copy_inner)
    M, N, I = 37, 130, 64
    G = strided_copy(randn((M, N), torch.float32, rng, device), layout)
    X = strided_copy(randn((M, I), torch.float32, rng, device), "padded" if layout == "expanded" else layout)
    W = strided_copy(randn((N, I), torch.float32, rng, device), "padded" if layout == "expanded" else layout)
    idx = random_idx(N, 41, rng, device)
    for mode in MODES:
        check_both(G, X, W, idx, mode=mode)
    # strided outputs: a transposed grad_x buffer and a padded grad_W buffer
    rx, rw, bx, bw = exact(G, X, W, idx)
    ox = poisoned((I, M), torch.float32, device).t()
    ow = strided_copy(poisoned((N, I), torch.float32, device), "padded")
    assert_reduction_close(gx(G, W, idx, out=ox), rx, bx, 41, what="grad_x strided out")
    assert_reduction_close(gw(G, X, idx, out=ow), rw, bw, M, what="grad_W strided out")


def test_three_d_inputs_flattened(rng, device):
    x3 = randn((5, 7, 64), torch.float32, rng, device).transpose(0, 1)  # (7, 5, 64) strided
    g3 = randn((7, 5, 130), torch.float32, rng, device)
    W = randn((130, 64), torch.float32, rng, device)
    G, X = g3.reshape(-1, 130), x3.reshape(-1, 64)
    for mode in MODES:
        check_both(G, X, W, random_idx(130, 13, rng, device), mode=mode)


@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DTYPE_IDS[:2])
def test_nonfinite_grad(dtype, rng, device):
    """NaN / inf in the selected columns of G propagate as in the reference."""
    M, N, I = 37, 130, 64
    G = randn((M, N), dtype, rng, device)
    X = randn((M, I), dtype, rng, device)
    W = randn((N, I), dtype, rng, device)
    G[3, 5] = math.nan
    G[10, 7] = math.inf
    G[11, 9] = -math.inf
    idx = torch.tensor([5, 7, 9, 20, 100], device=device)
    rx, rw, bx, bw = exact(G, X, W, idx)
    for mode in MODES:
        assert_reduction_close(gx(G, W, idx, mode=mode), rx, bx, 5, what="grad_x")
        assert_reduction_close(gw(G, X, idx, mode=mode), rw, bw, M, what="grad_W")
    # rows outside idx are exact zeros even so
    rest = torch.ones(N, dtype=torch.bool)
    rest[idx.cpu()] = False
    assert (gw(G, X, idx).cpu()[rest] == 0).all()


def test_weight_rows_zero_and_unsorted_idx(rng, device):
    """Any order of distinct idx works; the complement rows come back exactly zero."""
    M, N, I = 7, 130, 64
    G = randn((M, N), torch.float32, rng, device)
    X = randn((M, I), torch.float32, rng, device)
    idx = torch.randperm(N, generator=rng)[:50].to(device)  # not sorted
    res = gw(G, X, idx, rest=None).cpu()
    rx, rw, bx, bw = exact(G, X, torch.zeros(N, I, device=device), idx)
    assert_reduction_close(res, rw, bw, M, what="grad_W")
    keep = torch.ones(N, dtype=torch.bool)
    keep[idx.cpu()] = False
    assert torch.equal(res[keep], torch.zeros_like(res[keep]))


def test_no_tokens(rng, device):
    """M = 0: grad_x is empty, grad_W is all zeros (selected rows included)."""
    G = torch.empty((0, 130), device=device)
    X = torch.empty((0, 64), device=device)
    W = randn((130, 64), torch.float32, rng, device)
    idx = random_idx(130, 10, rng, device)
    for mode in MODES:
        assert gx(G, W, idx, mode=mode).shape == (0, 64)
        assert torch.equal(gw(G, X, idx, mode=mode), torch.zeros(130, 64, device=device))


def _all_configs():
    from meprop_triton.kernels import matmul

    return [("grad_input", i) for i in range(len(matmul.grad_input_configs()))] + [
        ("grad_weight", i) for i in range(len(matmul.grad_weight_configs()))
    ]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("which,i", _all_configs(), ids=[f"{w}-cfg{i}" for w, i in _all_configs()])
def test_every_shipped_config(which, i, mode, rng, device):
    """Each autotune config computes the same thing (the tests otherwise run config 0)."""
    from meprop_triton.kernels import matmul

    M, N, I = 70, 300, 130
    G = randn((M, N), torch.float16, rng, device)
    X = randn((M, I), torch.float16, rng, device)
    W = randn((N, I), torch.float16, rng, device)
    idx = random_idx(N, 150, rng, device)
    rx, rw, bx, bw = exact(G, X, W, idx)
    if which == "grad_input":
        cfg = matmul.grad_input_configs()[i]
        assert_reduction_close(gx(G, W, idx, config=cfg, mode=mode), rx, bx, 150, what=str(cfg))
    else:
        cfg = matmul.grad_weight_configs()[i]
        assert_reduction_close(gw(G, X, idx, config=cfg, mode=mode), rw, bw, M, what=str(cfg))


def test_prune_configs_for_plain_fp32():
    """fp32 without tf32 (FMA dot) keeps only small tiles; other inputs keep every config."""
    from meprop_triton.kernels import matmul

    for configs in (matmul.grad_input_configs(), matmul.grad_weight_configs()):
        f32, f16 = torch.empty(1), torch.empty(1, dtype=torch.float16)
        kept = matmul.prune_configs(configs, {"g_ptr": f32}, INPUT_PRECISION="ieee")
        assert kept and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64 for c in kept)
        assert matmul.prune_configs(configs, {"g_ptr": f32}, INPUT_PRECISION="tf32") == configs
        assert matmul.prune_configs(configs, {"g_ptr": f16}, INPUT_PRECISION="ieee") == configs


def test_keep_config_drops_the_tile_that_spills_on_sm80_under_old_triton():
    """fp32 through tf32 on sm_80 under triton < 3.7: tiles up to 128 x 128 only (the
    128 x 256 one spills in its main loop there); elsewhere every config is kept."""
    from meprop_triton.kernels import matmul

    cfgs = matmul.grad_input_configs()
    big = [c for c in cfgs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 128 * 128]
    assert big
    for c in cfgs:
        small = c not in big
        assert matmul.keep_config(c, torch.float32, "tf32", (8, 0), old_triton=True) == small
        assert matmul.keep_config(c, torch.float32, "tf32", (8, 0), old_triton=False)
        assert matmul.keep_config(c, torch.float32, "tf32", (9, 0), old_triton=True)
        assert matmul.keep_config(c, torch.bfloat16, "ieee", (8, 0), old_triton=True)


def test_autotuned_path(rng, device, monkeypatch):
    """The autotuner (not the single test config) picks a config and gets the same result."""
    if device != "cuda":
        pytest.skip("autotuning benchmarks on a GPU; the interpreter always runs one config")
    from meprop_triton.kernels import _launch

    monkeypatch.setattr(_launch, "FORCE_SINGLE_CONFIG", False)
    M, N, I = 300, 1000, 129
    for dtype in (torch.float32, torch.bfloat16):
        G = randn((M, N), dtype, rng, device)
        X = randn((M, I), dtype, rng, device)
        W = randn((N, I), dtype, rng, device)
        for mode in MODES:
            check_both(G, X, W, random_idx(N, 77, rng, device), mode=mode)


def test_deterministic(rng, device):
    M, N, I = 37, 130, 129
    G = randn((M, N), torch.float32, rng, device)
    X = randn((M, I), torch.float32, rng, device)
    W = randn((N, I), torch.float32, rng, device)
    idx = random_idx(N, 60, rng, device)
    for mode in MODES:
        a, b = gx(G, W, idx, mode=mode), gw(G, X, idx, mode=mode)
        assert torch.equal(a, gx(G, W, idx, mode=mode)) and torch.equal(b, gw(G, X, idx, mode=mode))


def test_rejects_mismatched_dtypes(rng, device):
    from meprop_triton.kernels.matmul import gathered_grad_input

    G = randn((3, 5), torch.float32, rng, device)
    W = randn((5, 4), torch.float16, rng, device)
    with pytest.raises(TypeError, match="share dtype"):
        gathered_grad_input(G, W, torch.tensor([1], device=device))
