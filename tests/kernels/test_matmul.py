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
MS, OUTS, INS = (1, 7, 37), (1, 5, 130, 1000), (3, 64, 129)
SHAPES = [(m, o, i) for m in MS for o in OUTS for i in INS] + [(70, 300, 130)]


def _cases():
    """(M, out, in, dtype) for the products test: every shape in every dtype, except at
    out = 1000 (two thirds of the interpreter time when run in full). There each (M, in)
    runs once in fp32 or fp16, in turn, and a third of them also in bf16: every shape
    runs in fp32 or fp16, and every dtype meets every M and every in."""
    for m, o, i in SHAPES:
        j = MS.index(m) + INS.index(i) if o == 1000 else 0
        for d, dtype in enumerate(DTYPES):
            if o != 1000 or (dtype != torch.bfloat16 and j % 2 == d) or (dtype == torch.bfloat16 and j % 3 == 2):
                yield pytest.param(m, o, i, dtype, id=f"M{m}_out{o}_in{i}-{DTYPE_IDS[d]}")


CASES = list(_cases())


def k_values(n_out: int) -> list[int]:
    return sorted({1, max(1, n_out - 1), n_out})


# G's columns gathered in the GEMM loads / compacted first (padded, as the backward
# does) / a caller's unpadded G[:, S]
MODES = ["gather", "compact", "unpadded"]


def compacted(G, idx):
    """``G[:, idx]`` through the gather kernel, into a NaN-poisoned buffer: the padded
    ``(M, padded_width(k))`` form, its extra columns checked to be zeros."""
    from meprop_triton.kernels.matmul import gather_columns, padded_width

    K = idx.shape[0]
    out = poisoned((G.shape[0], padded_width(K)), G.dtype, G.device)
    res = gather_columns(G, idx, out=out)
    assert res is out
    assert padded_width(K) % 16 == 0 and padded_width(K) - K < 16
    assert torch.equal(res[:, K:], torch.zeros_like(res[:, K:]))
    return res


def selected(G, idx, mode):
    """The ``grad_selected`` operand of a mode: None (gathered in the GEMM loads), the
    kernel's padded compaction, or a plain unpadded ``G[:, idx]``."""
    if mode == "gather":
        return None
    if mode == "compact":
        return compacted(G, idx)
    return G[:, idx].contiguous()


def gx(G, W, idx, config=None, out=None, mode="gather"):
    from meprop_triton.kernels.matmul import gathered_grad_input

    if out is None:
        out = poisoned((G.shape[0], W.shape[1]), G.dtype, G.device)
    res = gathered_grad_input(G, W, idx, grad_selected=selected(G, idx, mode), out=out, config=config)
    assert res is out
    return res


def gw(G, X, idx, rest="compute", config=None, out=None, mode="gather", split=None):
    from meprop_triton.kernels.matmul import complement, scattered_grad_weight

    if out is None:
        out = poisoned((G.shape[1], X.shape[1]), G.dtype, G.device)
    if isinstance(rest, str):
        rest = complement(idx, G.shape[1])
    res = scattered_grad_weight(
        G, X, idx, rest, grad_selected=selected(G, idx, mode), out=out, config=config, split=split
    )
    assert res is out
    return res


def exact(G, X, W, idx):
    """fp64 ``(grad_x, grad_W)`` and the same products of absolute values (the bounds)."""
    d = lambda t: t.detach().to(torch.float64).cpu()  # noqa: E731
    G, X, W, idx = d(G), d(X), d(W), idx.cpu()
    rx, rw, _ = reference.unified_backward(G, X, W, idx, need_bias=False)
    bx, bw, _ = reference.unified_backward(G.abs(), X.abs(), W.abs(), idx, need_bias=False)
    return rx, rw, bx, bw


def check_both(G, X, W, idx, config=None, mode="gather", split=None):
    K, M = idx.shape[0], G.shape[0]
    rx, rw, bx, bw = exact(G, X, W, idx)
    r = tf32_round(G.dtype)
    assert_reduction_close(gx(G, W, idx, config, mode=mode), rx, bx, K, in_round=r, what=f"grad_x ({mode})")
    assert_reduction_close(
        gw(G, X, idx, config=config, mode=mode, split=split), rw, bw, M, in_round=r,
        what=f"grad_W ({mode}, split {split})",
    )


def random_idx(n_out, k, rng, device):
    return torch.randperm(n_out, generator=rng)[:k].sort().values.to(device)


@pytest.mark.parametrize("M,N,I,dtype", CASES)
def test_products_match_reference(M, N, I, dtype, rng, device):
    skip_unsupported(dtype)
    G = randn((M, N), dtype, rng, device)
    X = randn((M, I), dtype, rng, device)
    W = randn((N, I), dtype, rng, device)
    for i, k in enumerate(k_values(N)):
        # the ways of reading G[:, S] and split-K slices, rotating over k values and shapes
        mode = MODES[(i + M + N + I) % 3]
        check_both(G, X, W, random_idx(N, k, rng, device), mode=mode, split=1 + (i + M) % 3)


def test_products_cases_cover_every_shape_and_pair():
    cases = [tuple(c.values) for c in CASES]
    wide = [c for c in cases if c[1] == 1000]
    assert len(wide) == 12
    # every shape in a dtype the interpreter runs
    assert {c[:3] for c in cases if c[3] != torch.bfloat16} == set(SHAPES)
    for pos in (0, 2):  # every dtype with every M and with every in, at out = 1000
        assert {(c[pos], c[3]) for c in wide} == {(c[pos], d) for c in wide for d in DTYPES}
    assert all(sum(c[:3] == s for c in cases) == len(DTYPES) for s in SHAPES if s[1] != 1000)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_both_modes_odd_shape(dtype, mode, rng, device):
    skip_unsupported(dtype)
    M, N, I = 37, 130, 129
    G = randn((M, N), dtype, rng, device)
    X = randn((M, I), dtype, rng, device)
    W = randn((N, I), dtype, rng, device)
    for k in (1, 16, 17, 41, 129, 130):
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
        got = compacted(G, idx)[:, : idx.shape[0]]
        assert torch.equal(got.isnan(), G[:, idx].isnan())
        assert torch.equal(got.nan_to_num(), G[:, idx].nan_to_num())


@pytest.mark.parametrize("M", [37, 0], ids=["rows", "no-rows"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "padded"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gather_columns_with_weight_rows(layout, M, dtype, rng, device):
    """``weight=``: the same launch gathers W[idx] into a NaN-poisoned ``(kp, in)``
    buffer, rows after k zeros, from any layout of W, NaN and inf carried exactly; G's
    columns come out as without it."""
    from meprop_triton.kernels.matmul import gather_columns, padded_width

    G = randn((M, 130), dtype, rng, device)
    W = randn((130, 300), dtype, rng, device)  # in = 300: a partial tile of W's columns
    W[5, 3], W[7, 299] = math.nan, -math.inf
    W = strided_copy(W, layout)
    for idx in (torch.tensor([5], device=device), random_idx(130, 60, rng, device), torch.arange(130, device=device)):
        K, KP = idx.shape[0], padded_width(idx.shape[0])
        w_out = poisoned((KP, 300), dtype, device)
        g_sel, w_sel = gather_columns(G, idx, weight=W, weight_out=w_out)
        assert w_sel is w_out and g_sel.shape == (M, KP)
        assert torch.equal(w_sel[:K].isnan(), W[idx].isnan())
        assert torch.equal(w_sel[:K].nan_to_num(), W[idx].nan_to_num())
        assert torch.equal(w_sel[K:], torch.zeros_like(w_sel[K:]))
        assert torch.equal(g_sel, gather_columns(G, idx))
    other = W.float() if dtype != torch.float32 else W.half()  # a supported dtype, not grad's
    with pytest.raises(ValueError, match="weight must match grad"):
        gather_columns(G, idx, weight=other)


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
        split = 1 + i % 3
        assert_reduction_close(gw(G, X, idx, config=cfg, mode=mode, split=split), rw, bw, M, what=f"{cfg} split {split}")


def test_prune_configs_for_plain_fp32():
    """fp32 without tf32 (FMA dot) keeps only small tiles; tensor-core inputs on sm_90
    (the capability off CUDA) keep the tiles wgmma takes (64 rows or more)."""
    from meprop_triton.kernels import matmul

    for configs in (matmul.grad_input_configs(), matmul.grad_weight_configs()):
        f32, f16 = torch.empty(1), torch.empty(1, dtype=torch.float16)
        kept = matmul.prune_configs(configs, {"g_ptr": f32}, INPUT_PRECISION="ieee")
        assert kept and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64 for c in kept)
        for g, prec in ((f32, "tf32"), (f16, "ieee")):
            kept = matmul.prune_configs(configs, {"g_ptr": g}, INPUT_PRECISION=prec, GATHER_G=False)
            assert kept and all(c.kwargs["BLOCK_M"] >= 64 for c in kept)
            assert len(kept) >= len(configs) - 4
        assert matmul.prune_configs(configs, {"g_ptr": f16}, INPUT_PRECISION="ieee", GATHER_G=True) == configs


def test_keep_config_by_architecture():
    """sm_80: every tile for 16-bit inputs but 128 x 256 with BLOCK_K = 64 or with G
    gathered in the loads; fp32 through tf32 under triton < 3.7 only up to 128 x 128
    (the 128 x 256 tile spills in its main loop there). sm_90: tiles of 64 rows or more
    (wgmma), and never an operand ring larger than shared memory."""
    from meprop_triton.kernels import matmul

    cfgs = matmul.grad_input_configs()
    big = [c for c in cfgs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 128 * 128]
    assert big
    for c in cfgs:
        kw = c.kwargs
        ring32 = c.num_stages * (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * 4
        fits32 = ring32 <= matmul.SHARED_LIMIT[8] - 8192
        small = c not in big
        sm80_ok = not (kw["BLOCK_K"] >= 64 and not small)  # 128 x 256 x 64 spills there
        assert matmul.keep_config(c, torch.float32, "tf32", (8, 0), old_triton=True) == (small and fits32)
        assert matmul.keep_config(c, torch.float32, "tf32", (8, 0), old_triton=False) == (fits32 and sm80_ok)
        assert matmul.keep_config(c, torch.bfloat16, "ieee", (8, 0), old_triton=True) == sm80_ok
        assert matmul.keep_config(c, torch.bfloat16, "ieee", (9, 0)) == (kw["BLOCK_M"] >= 64)
        # G gathered in the loads: the 32-row tiles stay on sm_90 too; on sm_80 no
        # 128 x 256 tile (246-255 registers, a stack frame under triton 3.7.1)
        assert matmul.keep_config(c, torch.bfloat16, "ieee", (9, 0), gather=True)
        assert matmul.keep_config(c, torch.bfloat16, "ieee", (8, 0), gather=True) == small
    # the largest fp32 ring does not fit: 3 x (128 + 256) x 64 x 4 B = 288 KiB
    assert not matmul.keep_config(cfgs[-1], torch.float32, "tf32", (9, 0))


def test_weight_split():
    """Split-K sizing: one program per SM for every config (tiles at most
    MAX_WEIGHT_TILE), slices of at least MIN_SPLIT_TOKENS tokens, none when the tiles
    already fill the GPU."""
    from meprop_triton.kernels import _launch, matmul

    for c in matmul.grad_weight_configs():
        assert c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= matmul.MAX_WEIGHT_TILE
    cuda = torch.device("cuda")
    orig = _launch.num_sms
    try:
        _launch.num_sms = lambda device: 132
        assert matmul.weight_split(8192, 205, 4096, cuda) == 3
        assert matmul.weight_split(8192, 41, 4096, cuda) == 14
        assert matmul.weight_split(8192, 4096, 4096, cuda) == 1
        assert matmul.weight_split(600, 41, 4096, cuda) == 1
        for K in (1, 41, 205, 410, 1024):
            split = matmul.weight_split(8192, K, 4096, cuda)
            for c in matmul.grad_weight_configs():
                tiles = -(-K // c.kwargs["BLOCK_M"]) * -(-4096 // c.kwargs["BLOCK_N"])
                assert tiles * split >= 132 or split == matmul.MAX_SPLIT, (K, c)
    finally:
        _launch.num_sms = orig


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_split_k_matches_reference_and_repeats(dtype, mode, rng, device):
    """grad_W with its token reduction split in slices (fp32 partial sums added in a
    fixed order): equal to the reference, and bit for bit the same run after run;
    more slices than steps (empty slices) included."""
    skip_unsupported(dtype)
    M, N, I = 70, 130, 129
    G = randn((M, N), dtype, rng, device)
    X = randn((M, I), dtype, rng, device)
    idx = random_idx(N, 41, rng, device)
    rx, rw, bx, bw = exact(G, X, torch.zeros(N, I, dtype=dtype, device=device), idx)
    for split in (2, 3, 8):
        got = gw(G, X, idx, mode=mode, split=split)
        assert_reduction_close(got, rw, bw, M, in_round=tf32_round(dtype), what=f"split {split}")
        assert torch.equal(got, gw(G, X, idx, mode=mode, split=split))


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
