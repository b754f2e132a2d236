"""kernels/per_example.py and the per-example / given-selection ops of triton_ops.py,
against reference.py: selected indices exactly, values within a bound scaled by the
reduction length, outputs poisoned (NaN / -1) before the kernels write them.

Every dtype runs under the interpreter too: the per-example kernels use no ``tl.dot``,
and ``unified_backward_from_indices`` runs its products by ``torch.mm`` (the default
cuBLAS route) or by the compacted Triton GEMMs (``tl.dot``, whose bf16 products the
interpreter computes right only with ``kernel_checks._emulate_bf16_dot``), both tested.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kernel_checks import (
    DEVICE,
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

# (M, out, in): every combination of M in {1, 7, 37}, out in {1, 5, 130, 1000}, in in
# {3, 64, 129}.
SHAPES = [(m, o, i) for m in (1, 7, 37) for o in (1, 5, 130, 1000) for i in (3, 64, 129)]
SHAPE_IDS = [f"M{m}_out{o}_in{i}" for m, o, i in SHAPES]
SELECT_SHAPES = [(m, o) for m in (1, 7, 37) for o in (1, 5, 130, 1000)] + [(3, 2049)]


def k_values(n_out: int) -> list[int]:
    return sorted({1, max(1, n_out - 1), n_out})


def _d(t):
    return t.detach().to(torch.float64).cpu()


# --- inputs ----------------------------------------------------------------------------

ROW_KINDS = ["random", "ties", "all_equal", "zeros", "nonfinite", "close"]


def mixed_grad(M, N, dtype, rng, device, *, kinds=ROW_KINDS):
    """Random G whose rows cycle through hard cases for the selection:

    ``ties``: small integers (many exact ties, signed zeros); ``all_equal``: one
    magnitude with random signs; ``zeros``: +0 / -0 / subnormals among normal values;
    ``nonfinite``: +inf, -inf and NaN (all count as +inf, tied, lower index first);
    ``close``: magnitudes a few ulps apart (ties only after rounding to fp16 / bf16).
    Row m has kind ``kinds[(m + N) % len(kinds)]``, so a one-row G varies with N too.
    """
    G = torch.randn(M, N, generator=rng, dtype=torch.float32)
    for m in range(M):
        kind = kinds[(m + N) % len(kinds)]
        row = G[m]
        if kind == "ties":
            row.copy_(torch.randint(-3, 4, (N,), generator=rng).float())
            row[1::4] = -0.0
        elif kind == "all_equal":
            row.copy_(torch.where(torch.rand(N, generator=rng) < 0.5, -2.5, 2.5))
        elif kind == "zeros":
            row[::3] = 0.0
            row[1::7] = -0.0
            row[2::11] = 1e-40 if dtype == torch.float32 else 3e-6
            row[4::13] = -1e-40 if dtype == torch.float32 else -3e-6
        elif kind == "nonfinite":
            row[1::5] = math.inf
            row[3::7] = math.nan
            row[4::9] = -math.inf
        elif kind == "close":
            row.copy_((1.0 + torch.randint(0, 8, (N,), generator=rng).float() * 2.0**-20) * torch.sign(row))
        elif kind != "random":
            raise ValueError(kind)
    return G.to(dtype).to(device)


def random_selection(M, N, k, rng, device, *, shuffle=False):
    """A per-example random (M, k) selection, ascending per row (or shuffled)."""
    idx = reference.per_example_random_indices(M, N, k, generator=rng)
    if shuffle:
        idx = idx.gather(1, torch.argsort(torch.rand(M, k, generator=rng), dim=1))
    return idx.to(device)


# --- launch helpers with poisoned outputs ----------------------------------------------


def select(G, k, config=None):
    """The selection, and the masked copy of G from a second launch with ``masked=``:
    the same indices, and G's bits where they select, +0 elsewhere."""
    from meprop_triton.kernels.per_example import row_topk_indices

    out = poisoned((G.shape[0], k), torch.int64, G.device)
    res = row_topk_indices(G, k, out=out, config=config)
    assert res is out
    out2 = poisoned((G.shape[0], k), torch.int64, G.device)
    masked = poisoned(tuple(G.shape), G.dtype, G.device)
    assert row_topk_indices(G, k, out=out2, masked=masked, config=config) is out2
    assert torch.equal(out2, res), "the masked launch selected otherwise"
    check_masked(G, res, masked)
    return res


def _bits(t):
    return t.cpu().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def check_masked(G, idx, masked):
    """``masked``: G's entries at ``idx``, bit for bit (-0, signs, inf), +0 at every other
    one; NaN where G has NaN (the interpreter loads fp16 / bf16 through fp32, which keeps
    no NaN payload; a GPU's select keeps it)."""
    want = torch.zeros(G.shape, dtype=G.dtype)
    G, idx, masked = G.cpu(), idx.cpu(), masked.cpu()
    want.scatter_(1, idx, G.gather(1, idx))
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(masked), nan), "masked copy: NaN where G has none, or none where it has"
    assert torch.equal(_bits(masked)[~nan], _bits(want)[~nan]), "masked copy differs"


def gx(G, W, idx, config=None, out=None):
    from meprop_triton.kernels.per_example import gathered_rows_grad_input

    if out is None:
        out = poisoned((G.shape[0], W.shape[1]), G.dtype, G.device)
    res = gathered_rows_grad_input(G, W, idx, out=out, config=config)
    assert res is out
    return res


def gw(G, X, idx, config=None, out=None):
    from meprop_triton.kernels.per_example import sorted_pairs_grad_weight

    if out is None:
        out = poisoned((G.shape[1], X.shape[1]), G.dtype, G.device)
    res = sorted_pairs_grad_weight(G, X, idx, out=out, config=config)
    assert res is out
    return res


def exact(G, X, W, idx):
    """fp64 per-example ``(grad_x, grad_W, grad_b)`` and the same with absolute values."""
    idx = idx.cpu()
    ref = reference.per_example_backward(_d(G), _d(X), _d(W), idx)
    bound = reference.per_example_backward(_d(G).abs(), _d(X).abs(), _d(W).abs(), idx)
    return ref, bound


def check_products(G, X, W, idx):
    (rx, rw, _), (bx, bw, _) = exact(G, X, W, idx)
    M, k = idx.shape
    assert_reduction_close(gx(G, W, idx), rx, bx, k, what="grad_x")
    assert_reduction_close(gw(G, X, idx), rw, bw, max(M, 1), what="grad_W")


# --- selection -------------------------------------------------------------------------


def spec_row_topk(G, k):
    """The per-row selection as the README's "Semantics" states it, independently: the k largest
    ``|G[m, :]|`` with NaN and inf both +inf, ties to the lower index (a stable sort)."""
    a = G.detach().cpu().to(torch.float64).abs()
    a = torch.where(torch.isnan(a), math.inf, a)
    return torch.sort(a, dim=1, descending=True, stable=True).indices[:, :k].sort(dim=1).values


def check_selection(G, k, got):
    """``got`` equals the spec exactly, and reference.per_example_topk_indices."""
    got = got.cpu()
    want = spec_row_topk(G, k)
    bad = (got != want).any(1).nonzero().flatten().tolist()
    assert not bad, f"k={k}: rows {bad[:10]} differ from the spec"
    ref = reference.per_example_topk_indices(G.cpu(), k)
    assert torch.equal(got, ref), f"k={k}: differs from reference.per_example_topk_indices"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M,N", SELECT_SHAPES, ids=[f"M{m}_out{n}" for m, n in SELECT_SHAPES])
def test_row_topk_matches_reference(M, N, dtype, rng, device):
    """The spec exactly (and the reference on rows without NaN): ties, signed zeros,
    NaN / inf, for k = 1, out - 1, out and one in between."""
    G = mixed_grad(M, N, dtype, rng, device)
    # fp32 takes k = 1, out // 3, out - 1, out; the half types one each (interpreter time)
    ks = {
        torch.float32: {1, max(1, N // 3), max(1, N - 1), N},
        torch.float16: {max(1, N // 3)},
        torch.bfloat16: {max(1, N - 1)},
    }[dtype]
    for k in sorted(ks):
        check_selection(G, k, select(G, k))


def test_row_topk_long_rows(rng, device):
    """Rows of 64 Ki units (64 blocks per row: the streaming kernel), ties at the
    threshold; subnormals in fp32 and in 16 bits ranked above zeros (keys of the
    values' own bits, never a float operation that could flush them)."""
    N = 65536
    G = torch.randn(2, N, generator=rng)
    G[1] = torch.randint(0, 3, (N,), generator=rng).float()  # ~N/3 exact ties per value
    G[1, 12345] = math.nan
    G = G.to(device)
    for k in (1, 777, N // 2 + 1, N - 1):
        check_selection(G, k, select(G, k))
    for dtype, tiny in ((torch.float32, 1e-40), (torch.bfloat16, 1e-40), (torch.float16, 3e-6)):
        S = torch.zeros(1, 16385, dtype=dtype)
        S[0, 5], S[0, 9000], S[0, 16384] = tiny, -2 * tiny, -0.0
        S = S.to(device)
        assert select(S, 1).tolist() == [[9000]] and select(S, 2).tolist() == [[5, 9000]]


@pytest.mark.parametrize("layout", ["transposed", "padded", "expanded"])
def test_row_topk_strided(layout, rng, device):
    G = strided_copy(mixed_grad(13, 130, torch.float16, rng, device), layout)
    for k in (1, 129):
        check_selection(G, k, select(G, k))


def _select_configs():
    from meprop_triton.kernels.per_example import select_configs

    return select_configs()


@pytest.mark.parametrize("i", range(len(_select_configs())))
def test_every_select_config(i, rng, device):
    """Each config, forced, on rows that fill its block (resident) or span several
    (streaming); the resident ones' prefix sums over several chunks."""
    cfg = _select_configs()[i]
    N = cfg["BLOCK"] - 3 if cfg["RESIDENT"] else 1500
    M = 13 if N <= 4096 else 2  # (interpreter time)
    for dtype in (torch.float32, torch.bfloat16):
        G = mixed_grad(M, N, dtype, rng, device)
        for k in (1, N // 2 + 1, N - 1):
            check_selection(G, k, select(G, k, cfg))


def test_select_config_rule():
    """A fixed rule (no timing): the smallest resident block that holds the row, else
    the streaming config."""
    from meprop_triton.kernels.per_example import pick_select_config, select_configs

    cfgs = select_configs()
    resident = [c for c in cfgs if c["RESIDENT"]]
    stream = [c for c in cfgs if not c["RESIDENT"]]
    assert len(stream) == 1 and resident == sorted(resident, key=lambda c: c["BLOCK"])
    assert pick_select_config(1) == resident[0] and pick_select_config(resident[0]["BLOCK"]) == resident[0]
    assert pick_select_config(resident[0]["BLOCK"] + 1) == resident[1]
    assert pick_select_config(4096)["BLOCK"] == 4096
    top = resident[-1]["BLOCK"]
    assert pick_select_config(top) == resident[-1]
    assert pick_select_config(top + 1) == stream[0] and pick_select_config(10**6) == stream[0]
    for c in resident:  # at most 64 keys a thread: what compiles without spills (test_aot)
        assert c["BLOCK"] // (32 * c["num_warps"]) <= 64 and c["CHUNK"] <= c["BLOCK"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_row_select_masked_nonfinite_and_strided(dtype, rng, device):
    """The masked copy from rows of every hard kind, any layout of G: NaN (one with a
    payload and the sign set, as torch writes a bf16 NaN), infinities and signed zeros
    of the selected entries kept as they are."""
    G = mixed_grad(12, 700, dtype, rng, device)
    G[5, 3] = float("nan")
    for layout in ("contiguous", "transposed"):
        Gl = strided_copy(G, layout)
        for k in (1, 350, 699):
            check_selection(Gl, k, select(Gl, k))


# --- the counting sort -----------------------------------------------------------------


@pytest.mark.parametrize("M,N,k", [(1, 1, 1), (7, 5, 4), (37, 1000, 999), (300, 130, 65), (300, 70, 1)])
def test_unit_lists(M, N, k, rng, device):
    """(crow, rows): each unit's examples ascending, exactly, from any order of idx."""
    from meprop_triton.kernels.per_example import unit_lists

    idx = random_selection(M, N, k, rng, device, shuffle=True)
    crow, rows = unit_lists(idx, N)
    cols = idx.cpu().reshape(-1)
    order = torch.argsort(cols, stable=True)  # row-major pairs: stable keeps m ascending
    want_rows = torch.arange(M).repeat_interleave(k)[order]
    want_crow = torch.zeros(N + 1, dtype=torch.int64)
    want_crow[1:] = torch.cumsum(torch.bincount(cols, minlength=N), 0)
    assert torch.equal(crow.cpu(), want_crow)
    assert rows.dtype == torch.int32 and torch.equal(rows.cpu().long(), want_rows)


def test_unit_lists_drop_out_of_range(device):
    from meprop_triton.kernels.per_example import unit_lists

    idx = torch.tensor([[0, 4, -1], [9, 2, 4]], device=device)
    crow, rows = unit_lists(idx, 5)
    assert crow.cpu().tolist() == [0, 1, 1, 2, 2, 4]
    assert rows.cpu()[:4].tolist() == [0, 1, 0, 1]


# --- products --------------------------------------------------------------------------


def _latin(M, N, I):
    """(k kind, dtype index, random selection?) for a shape: for each (M, out) the three
    in values take every k kind (1, out - 1, out) and every dtype, each (k kind, dtype)
    pair meets 4 of the 36 shapes, and out = 1000 meets all 9 pairs."""
    a, b, c = (1, 7, 37).index(M), (1, 5, 130, 1000).index(N), (3, 64, 129).index(I)
    return (a + b + c) % 3, (b + c + 1) % 3, (a + c) % 2 == 1


@pytest.mark.parametrize("M,N,I", SHAPES, ids=SHAPE_IDS)
def test_products_match_reference(M, N, I, rng, device):
    """Both products on every odd shape, one (k, dtype) per shape in a Latin square
    (interpreter time), on the reference's top-k selection or a shuffled random one
    (the selection kernel is checked above)."""
    kind, d, random_sel = _latin(M, N, I)
    k = (1, max(1, N - 1), N)[kind]
    dtype = DTYPES[d]
    G = mixed_grad(M, N, dtype, rng, device, kinds=["random", "ties", "close"])
    X = randn((M, I), dtype, rng, device)
    W = randn((N, I), dtype, rng, device)
    if random_sel:
        idx = random_selection(M, N, k, rng, device, shuffle=True)
    else:
        idx = reference.per_example_topk_indices(G.cpu(), k).to(device)
    check_products(G, X, W, idx)


def test_latin_square_covers_every_pair():
    pairs = [_latin(*s)[:2] for s in SHAPES]
    assert all(pairs.count((kind, d)) == 4 for kind in range(3) for d in range(3))
    assert {_latin(*s)[:2] for s in SHAPES if s[1] == 1000} == {(a, b) for a in range(3) for b in range(3)}


def test_products_many_rows(rng, device):
    """M = 150: the counting sort walks two row tiles; grad_W's lists (~75 rows) take
    two steps of the config's BLOCK_L = 64."""
    M, N, I = 150, 70, 64
    G, X = randn((M, N), torch.float32, rng, device), randn((M, I), torch.float32, rng, device)
    W = randn((N, I), torch.float32, rng, device)
    check_products(G, X, W, select(G, 35))


def _configs():
    from meprop_triton.kernels import per_example as pe

    return [("grad_input", i) for i in range(len(pe.grad_input_configs()))] + [
        ("grad_weight", i) for i in range(len(pe.grad_weight_configs()))
    ]


@pytest.mark.parametrize("which,i", _configs(), ids=[f"{w}-cfg{i}" for w, i in _configs()])
def test_every_product_config(which, i, rng, device):
    """Every shipped config computes the same thing (the shape picks one otherwise)."""
    from meprop_triton.kernels import per_example as pe

    M, N, I = 37, 130, 129  # partial column blocks for every BLOCK_N
    G = randn((M, N), torch.float16, rng, device)
    X, W = randn((M, I), torch.float16, rng, device), randn((N, I), torch.float16, rng, device)
    idx = random_selection(M, N, 40, rng, device)
    (rx, rw, _), (bx, bw, _) = exact(G, X, W, idx)
    if which == "grad_input":
        cfg = pe.grad_input_configs()[i]
        assert_reduction_close(gx(G, W, idx, cfg), rx, bx, 40, what=str(cfg))
    else:
        cfg = pe.grad_weight_configs()[i]
        assert_reduction_close(gw(G, X, idx, cfg), rw, bw, M, what=str(cfg))


def test_product_config_rule():
    from meprop_triton.kernels import per_example as pe

    for cfgs in (pe.grad_input_configs(), pe.grad_weight_configs()):
        widths = [c["BLOCK_N"] for c in cfgs]
        assert widths == sorted(widths)
        for n_in in (1, 3, 32, 33, 64, 129, 256, 4096):
            got = pe.pick_product_config(cfgs, n_in)
            assert got == next((c for c in cfgs if n_in <= c["BLOCK_N"]), cfgs[-1])


@pytest.mark.parametrize(
    "layout,copy_inner",
    [("transposed", True), ("transposed", False), ("padded", False), ("expanded", True)],
    ids=["transposed-copy_non_unit_inner", "transposed-kernel_strides", "padded-kernel_strides", "expanded-copy"],
)
def test_strided_operands(layout, copy_inner, rng, device, monkeypatch):
    """Any strides for G, X, W, idx and the outputs: through the launchers' contiguous
    copy of a non-unit inner stride and straight through the general-stride code."""
    from meprop_triton.kernels import per_example as pe

    monkeypatch.setattr(pe, "COPY_NON_UNIT_INNER", copy_inner)
    M, N, I = 37, 130, 64
    other = "padded" if layout == "expanded" else layout
    G = strided_copy(randn((M, N), torch.float32, rng, device), layout)
    X = strided_copy(randn((M, I), torch.float32, rng, device), other)
    W = strided_copy(randn((N, I), torch.float32, rng, device), other)
    idx = select(G, 21)
    check_selection(G, 21, idx)
    idx_t = idx.t().contiguous().t()  # column-major (M, k)
    check_products(G, X, W, idx_t)
    if layout != "transposed" or not copy_inner:
        return
    (rx, rw, _), (bx, bw, _) = exact(G, X, W, idx)
    ox = poisoned((I, M), torch.float32, device).t()
    ow = strided_copy(poisoned((N, I), torch.float32, device), "padded")
    assert_reduction_close(gx(G, W, idx, out=ox), rx, bx, 21, what="grad_x strided out")
    assert_reduction_close(gw(G, X, idx, out=ow), rw, bw, M, what="grad_W strided out")


def test_three_d_inputs_flattened(rng, device):
    g3 = randn((7, 5, 130), torch.float32, rng, device)
    x3 = randn((5, 7, 64), torch.float32, rng, device).transpose(0, 1)  # (7, 5, 64) strided
    W = randn((130, 64), torch.float32, rng, device)
    G, X = g3.reshape(-1, 130), x3.reshape(-1, 64)
    check_products(G, X, W, select(G, 13))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf in numpy
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nonfinite_grad(dtype, rng, device):
    """NaN / inf in G are selected first and reach exactly the outputs the reference's
    do; every row of grad_W that no example selected is an exact zero."""
    M, N, I = 37, 130, 64
    G = randn((M, N), dtype, rng, device)
    X, W = randn((M, I), dtype, rng, device), randn((N, I), dtype, rng, device)
    G[3, 5] = math.nan
    G[10, 7] = math.inf
    G[11, 9] = -math.inf
    G[12, 7] = -math.inf  # +inf and -inf both selected for unit 7
    idx = select(G, 2)
    assert {5}.issubset(set(idx[3].tolist())) and {7}.issubset(set(idx[10].tolist()))
    (rx, rw, _), (bx, bw, _) = exact(G, X, W, idx)
    assert_reduction_close(gx(G, W, idx), rx, bx, 2, what="grad_x")
    res = gw(G, X, idx)
    assert_reduction_close(res, rw, bw, M, what="grad_W")
    res = res.cpu()
    never = torch.ones(N, dtype=torch.bool)
    never[idx.cpu().flatten()] = False
    assert never.any() and (res[never] == 0).all()
    assert torch.isnan(res[5]).all()


def test_deterministic(rng, device):
    """Two runs are bit-identical (no float atomics; fixed orders and configs)."""
    M, N, I = 37, 130, 129
    G = randn((M, N), torch.float32, rng, device)
    X, W = randn((M, I), torch.float32, rng, device), randn((N, I), torch.float32, rng, device)
    idx = select(G, 50)
    assert torch.equal(idx, select(G, 50))
    assert torch.equal(gx(G, W, idx), gx(G, W, idx)) and torch.equal(gw(G, X, idx), gw(G, X, idx))


def test_no_tokens(rng, device):
    G = torch.empty((0, 130), device=device)
    X = torch.empty((0, 64), device=device)
    W = randn((130, 64), torch.float32, rng, device)
    idx = torch.empty((0, 10), dtype=torch.int64, device=device)
    assert select(G, 10).shape == (0, 10)
    assert gx(G, W, idx).shape == (0, 64)
    assert torch.equal(gw(G, X, idx), torch.zeros(130, 64, device=device))


def test_launchers_reject_bad_arguments(rng, device):
    from meprop_triton.kernels.per_example import gathered_rows_grad_input, row_topk_indices

    G = randn((3, 5), torch.float32, rng, device)
    W = randn((5, 4), torch.float16, rng, device)
    with pytest.raises(TypeError, match="share dtype"):
        gathered_rows_grad_input(G, W, torch.zeros(3, 1, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="k must lie in"):
        row_topk_indices(G, 6)
    with pytest.raises(TypeError, match="2-D int64"):
        gathered_rows_grad_input(G, W.float(), torch.zeros(3, dtype=torch.int64, device=device))
    # A caller's output buffer of the wrong shape, dtype or layout is refused, named.
    idx = torch.zeros(3, 1, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match=r"out must have shape \(3, 4\), dtype torch.float32.*got \(3, 5\)"):
        gathered_rows_grad_input(G, W.float(), idx, out=torch.empty(3, 5, device=device))
    with pytest.raises(ValueError, match=r"out must have shape \(3, 2\), dtype torch.int64.*got \(3, 2\), torch.int32"):
        row_topk_indices(G, 2, out=torch.empty(3, 2, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="out must be contiguous"):
        row_topk_indices(G, 2, out=torch.empty(2, 3, dtype=torch.int64, device=device).t())
    with pytest.raises(ValueError, match=r"masked must have shape \(3, 5\), dtype torch.float32.*torch.float16"):
        row_topk_indices(G, 2, masked=torch.empty(3, 5, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match="masked must be contiguous"):
        row_topk_indices(G, 2, masked=torch.empty(5, 3, device=device).t())
    with pytest.raises(TypeError, match="masked must be a torch.Tensor; got list"):
        row_topk_indices(G, 2, masked=[[0.0] * 5] * 3)
    # masked over grad's own memory (in another layout, the kernel would read what it wrote)
    base = randn((5, 3), torch.float32, rng, device)
    with pytest.raises(ValueError, match="masked must not share memory with grad"):
        row_topk_indices(base.t(), 2, masked=base.view(3, 5))
    for bad in ({}, {"BLOCK": 512, "RADIX_BITS": 8, "num_warps": 4}):
        with pytest.raises(ValueError, match="config must be one of select_configs"):
            row_topk_indices(G, 2, config=bad)
    from meprop_triton.kernels.per_example import select_configs

    small = select_configs()[0]
    wide = randn((2, small["BLOCK"] + 1), torch.float32, rng, device)
    with pytest.raises(ValueError, match=f"holds rows of at most {small['BLOCK']} units; got {small['BLOCK'] + 1}"):
        row_topk_indices(wide, 1, config=small)


# --- the ops ---------------------------------------------------------------------------


def check_op(got, G, X, W, ref_fn, idx, need, k_len):
    """``got`` (the op's outputs) against ``ref_fn`` in fp64 with the abs-value bounds."""
    ref = ref_fn(_d(G), _d(X), _d(W), idx.cpu())
    bound = ref_fn(_d(G).abs(), _d(X).abs(), _d(W).abs(), idx.cpu())
    r = tf32_round(G.dtype)
    for out, want, bnd, length, needed, what in zip(
        got, ref, bound, (k_len, G.shape[0], G.shape[0]), need, ("grad_x", "grad_W", "grad_b")
    ):
        if needed:
            assert out is not None and out.dtype == G.dtype and out.device == G.device, what
            assert_reduction_close(out, want, bnd, max(length, 1), in_round=r, what=what)
        else:
            assert out is None, what


OP_SHAPES = [(1, 5, 3), (37, 130, 64), (7, 300, 129)]


OP_CASES = [(s, d) for s in OP_SHAPES for d in DTYPES if d == torch.float32 or s == (37, 130, 64)]


@pytest.mark.parametrize("M,N,I,dtype", [(*s, d) for s, d in OP_CASES], ids=[f"{s}-{str(d)[6:]}" for s, d in OP_CASES])
def test_per_example_topk_op(M, N, I, dtype, rng, device):
    from meprop_triton.triton_ops import per_example_topk_backward

    G = mixed_grad(M, N, dtype, rng, device, kinds=["random", "ties"])
    X, W = randn((M, I), dtype, rng, device), randn((N, I), dtype, rng, device)
    # k = 1, out - 1, out on the middle shape in fp32; one k in between otherwise
    full = dtype == torch.float32 and (M, N, I) == (37, 130, 64)
    for k in k_values(N) if full else [max(1, N // 4)]:
        idx = reference.per_example_topk_indices(G.cpu(), k)
        got = per_example_topk_backward(G, X, W, k)
        check_op(got, G, X, W, reference.per_example_backward, idx, (True, True, True), k)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_per_example_random_op(dtype, rng, device):
    """Per-example random-k: the (M, k) draw of reference.per_example_random_indices on
    the device, then the gather / sorted-scatter products."""
    from meprop_triton.triton_ops import per_example_backward_from_indices

    M, N, I, k = 37, 130, 64, 20
    G = randn((M, N), dtype, rng, device)
    X, W = randn((M, I), dtype, rng, device), randn((N, I), dtype, rng, device)
    gen = torch.Generator(device=device).manual_seed(7)
    idx = reference.per_example_random_indices(M, N, k, generator=gen, device=device)
    got = per_example_backward_from_indices(G, X, W, idx)
    check_op(got, G, X, W, reference.per_example_backward, idx, (True, True, True), k)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M,N,I", OP_SHAPES, ids=[str(s) for s in OP_SHAPES])
def test_unified_random_op(M, N, I, dtype, rng, device, gemm_route):
    """Unified random-k: reference.random_indices on the device, then the compacted
    GEMMs; the complement is made on the device. Sorted and unsorted selections."""
    skip_unsupported(dtype)
    from meprop_triton.triton_ops import unified_backward_from_indices

    G = randn((M, N), dtype, rng, device)
    X, W = randn((M, I), dtype, rng, device), randn((N, I), dtype, rng, device)
    gen = torch.Generator(device=device).manual_seed(11)
    for i, k in enumerate(k_values(N)):
        idx = reference.random_indices(N, k, generator=gen, device=device)
        if i == 1:
            idx = idx.flip(0)  # any order
        got = unified_backward_from_indices(G, X, W, idx)
        check_op(got, G, X, W, reference.unified_backward, idx, (True, True, True), k)
        never = torch.ones(N, dtype=torch.bool)
        never[idx.cpu()] = False
        assert (got[1].cpu()[never] == 0).all()


@pytest.mark.parametrize("need", [(True, True, True), (True, False, False), (False, True, True)], ids=["xwb", "x--", "-wb"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_masked_route(dtype, need, rng, device, monkeypatch):
    """The other exact route for per-example products (G masked, two dense GEMMs),
    forced: the same gradients as the reference, top-k and given selections, strided
    G, ties and NaN-free mixed rows."""
    skip_unsupported(dtype)
    from meprop_triton import triton_ops as T

    monkeypatch.setattr(T, "PER_EXAMPLE_ROUTE", "masked")
    M, N, I, k = 37, 130, 64, 20
    G = mixed_grad(M, N, dtype, rng, device, kinds=["random", "ties"]).t().contiguous().t()  # column-major
    X, W = randn((M, I), dtype, rng, device), randn((N, I), dtype, rng, device)
    idx = reference.per_example_topk_indices(G.cpu(), k)
    check_op(T.per_example_topk_backward(G, X, W, k, *need), G, X, W, reference.per_example_backward, idx, need, k)
    gen = torch.Generator(device=device).manual_seed(3)
    idx_r = reference.per_example_random_indices(M, N, k, generator=gen, device=device)
    got = T.per_example_backward_from_indices(G, X, W, idx_r, *need)
    check_op(got, G, X, W, reference.per_example_backward, idx_r, need, k)
    # given indices always take the gather kernels, which skip out-of-range ones when
    # the check is off (it refuses them by default: test_given_indices_are_checked)
    bad = idx_r.clone()
    bad[0, 0] = N
    skipped = T.per_example_backward_from_indices(G, X, W, bad, True, False, False, check_indices=False)[0]
    assert torch.isfinite(skipped).all()


def test_given_indices_are_checked(rng, device):
    """The from-indices ops refuse a unit out of range or repeated, naming it, before any
    work (on a GPU an out-of-range unit would fault, a repeated one give grad_x and
    grad_W that disagree); the layers' own draws skip the check (check_indices=False)
    and give the reference's gradients."""
    from meprop_triton import triton_ops as T

    M, N, I, k = 6, 40, 16, 5
    G = randn((M, N), torch.float32, rng, device)
    X, W = randn((M, I), torch.float32, rng, device), randn((N, I), torch.float32, rng, device)
    idx_pe = reference.per_example_random_indices(M, N, k, generator=rng).to(device)
    idx_u = reference.random_indices(N, k, generator=rng).to(device)
    cases = []
    for value, msg in ((N, rf"\[0, out_features={N}\); got {N}"), (-1, r"got -1")):
        bad = idx_pe.clone()
        bad[3, 2] = value
        cases.append((T.per_example_backward_from_indices, bad, msg))
        bad = idx_u.clone()
        bad[1] = value
        cases.append((T.unified_backward_from_indices, bad, msg))
    rep = idx_pe.clone()
    rep[4, 1] = rep[4, 3]
    cases.append((T.per_example_backward_from_indices, rep, rf"unit {int(rep[4, 3])} appears more than once in row 4"))
    rep = idx_u.clone()
    rep[0] = rep[k - 1]
    cases.append((T.unified_backward_from_indices, rep, rf"unit {int(rep[0])} appears more than once$"))
    for op, bad, msg in cases:
        before = bad.clone()
        with pytest.raises(ValueError, match=msg):
            op(G, X, W, bad)
        assert torch.equal(bad, before)
    for op, idx, ref in (
        (T.per_example_backward_from_indices, idx_pe, reference.per_example_backward),
        (T.unified_backward_from_indices, idx_u, reference.unified_backward),
    ):
        want = ref(G.cpu(), X.cpu(), W.cpu(), idx.cpu())
        for check in (True, False):
            got = op(G, X, W, idx, check_indices=check)
            for g, w in zip(got, want):
                torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-5)


def test_per_example_route_rule(monkeypatch):
    """The masked route from k/out >= 1/600 (16-bit), 1/300 (tf32), 1/50 (plain fp32), on
    >= 256 rows (the H200's crossover); the gather kernels otherwise; a forced route wins."""
    from meprop_triton import triton_ops as T

    route = T.per_example_route
    assert route(8192, 4096, 205, torch.bfloat16) == "masked"
    assert route(8192, 4096, 41, torch.bfloat16) == "masked"
    assert route(8192, 4096, 7, torch.bfloat16) == "masked"
    assert route(8192, 4096, 6, torch.bfloat16) == "gather"
    assert route(100, 4096, 2048, torch.float16) == "gather"
    tf32 = torch.backends.cuda.matmul.allow_tf32  # not a plain attribute: set and restore
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert route(8192, 4096, 13, torch.float32) == "gather"
        assert route(8192, 4096, 14, torch.float32) == "masked"
        torch.backends.cuda.matmul.allow_tf32 = False
        assert route(8192, 4096, 81, torch.float32) == "gather"
        assert route(8192, 4096, 82, torch.float32) == "masked"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    monkeypatch.setattr(T, "PER_EXAMPLE_ROUTE", "gather")
    assert route(8192, 4096, 2048, torch.bfloat16) == "gather"


NEEDS = list(itertools.product([True, False], repeat=3))
NEED_IDS = ["".join("xwb"[i] if v else "-" for i, v in enumerate(n)) for n in NEEDS]


@pytest.mark.parametrize("need", NEEDS, ids=NEED_IDS)
def test_need_flags(need, rng, device):
    from meprop_triton import triton_ops as T

    M, N, I, k = 7, 130, 64, 13
    G = randn((M, N), torch.float32, rng, device)
    X, W = randn((M, I), torch.float32, rng, device), randn((N, I), torch.float32, rng, device)
    pe_ref, u_ref = reference.per_example_backward, reference.unified_backward
    idx_pe = reference.per_example_topk_indices(G.cpu(), k)
    check_op(T.per_example_topk_backward(G, X, W, k, *need), G, X, W, pe_ref, idx_pe, need, k)
    idx_r = reference.per_example_random_indices(M, N, k, generator=rng).to(device)
    check_op(T.per_example_backward_from_indices(G, X, W, idx_r, *need), G, X, W, pe_ref, idx_r, need, k)
    idx_u = reference.random_indices(N, k, generator=rng).to(device)
    check_op(T.unified_backward_from_indices(G, X, W, idx_u, *need), G, X, W, u_ref, idx_u, need, k)


def test_ops_strided_and_three_d(rng, device):
    from meprop_triton import triton_ops as T

    g3 = randn((5, 7, 130), torch.float32, rng, device).transpose(0, 1)  # (7, 5, 130) strided
    x3 = randn((5, 7, 64), torch.float32, rng, device).transpose(0, 1)
    W = randn((64, 130), torch.float32, rng, device).t()  # column-major weight
    G, X = g3.reshape(-1, 130), x3.reshape(-1, 64)
    every = (True, True, True)
    idx = reference.per_example_topk_indices(G.cpu(), 20)
    check_op(T.per_example_topk_backward(G, X, W, 20), G, X, W, reference.per_example_backward, idx, every, 20)
    idx_u = reference.random_indices(130, 20, generator=rng).to(device)
    check_op(T.unified_backward_from_indices(G, X, W, idx_u), G, X, W, reference.unified_backward, idx_u, every, 20)


def test_ops_no_tokens(rng, device):
    from meprop_triton import triton_ops as T

    G = torch.empty((0, 130), device=device)
    X = torch.empty((0, 64), device=device)
    W = randn((130, 64), torch.float32, rng, device)
    zeros_w, zeros_b = torch.zeros(130, 64), torch.zeros(130)
    for gx_, gw_, gb_ in (
        T.per_example_topk_backward(G, X, W, 10),
        T.per_example_backward_from_indices(G, X, W, torch.empty((0, 10), dtype=torch.int64, device=device)),
        T.unified_backward_from_indices(G, X, W, torch.arange(10, device=device)),
    ):
        assert gx_.shape == (0, 64)
        assert torch.equal(gw_.cpu(), zeros_w) and torch.equal(gb_.cpu(), zeros_b)


def test_ops_deterministic(rng, device):
    from meprop_triton import triton_ops as T

    M, N, I = 37, 130, 64
    G = randn((M, N), torch.float32, rng, device)
    X, W = randn((M, I), torch.float32, rng, device), randn((N, I), torch.float32, rng, device)
    idx_u = reference.random_indices(N, 30, generator=rng).to(device)
    for fn in (
        lambda: T.per_example_topk_backward(G, X, W, 30),
        lambda: T.unified_backward_from_indices(G, X, W, idx_u),
    ):
        a, b = fn(), fn()
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_ops_nan_grad_reaches_outputs(rng, device):
    from meprop_triton.triton_ops import per_example_topk_backward

    G = randn((37, 130), torch.float32, rng, device) * 1e-3
    G[2, 99] = math.nan
    X, W = randn((37, 64), torch.float32, rng, device), randn((130, 64), torch.float32, rng, device)
    gx_, gw_, gb_ = per_example_topk_backward(G, X, W, 1)
    assert torch.isnan(gx_[2]).all() and torch.isnan(gw_[99]).all() and torch.isnan(gb_[99])
    assert not torch.isnan(gx_[3]).any()


def test_ops_opcheck(rng, device):
    """Schema, fake-tensor and AOT-dispatch checks (on a GPU: the triton_op decompositions)."""
    import meprop_triton.triton_ops  # noqa: F401

    M, N, I = 7, 130, 64
    G = randn((M, N), torch.float32, rng, device)
    X, W = randn((M, I), torch.float32, rng, device), randn((N, I), torch.float32, rng, device)
    idx_pe = reference.per_example_random_indices(M, N, 9, generator=rng).to(device)
    idx_u = reference.random_indices(N, 9, generator=rng).to(device)
    ops = torch.ops.meprop_triton
    torch.library.opcheck(ops.per_example_topk_backward.default, (G, X, W, 9, True, True, True))
    torch.library.opcheck(ops.per_example_backward_from_indices.default, (G, X, W, idx_pe, False, True, False))
    torch.library.opcheck(ops.unified_backward_from_indices.default, (G, X, W, idx_u, True, False, True))


def test_ops_torch_compile_one_graph(rng, device):
    from meprop_triton import triton_ops as T

    M, N, I = 7, 130, 64
    G = randn((M, N), torch.float32, rng, device)
    X, W = randn((M, I), torch.float32, rng, device), randn((N, I), torch.float32, rng, device)
    idx_pe = reference.per_example_random_indices(M, N, 9, generator=rng).to(device)
    idx_u = reference.random_indices(N, 9, generator=rng).to(device)
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    torch._dynamo.reset()
    for fn, args in (
        (lambda g, x, w: T.per_example_topk_backward(g, x, w, 9), (G, X, W)),
        # (the indices' check reads them on the host: a graph break, so off in one graph)
        (lambda g, x, w, i: T.per_example_backward_from_indices(g, x, w, i, check_indices=False), (G, X, W, idx_pe)),
        (lambda g, x, w, i: T.unified_backward_from_indices(g, x, w, i, check_indices=False), (G, X, W, idx_u)),
    ):
        got = torch.compile(fn, fullgraph=True, backend=backend)(*args)
        for a, b in zip(got, fn(*args)):
            assert torch.equal(a, b)


def test_ops_reject_bad_arguments(rng, device):
    from meprop_triton import triton_ops as T

    G = randn((3, 5), torch.float32, rng, device)
    X, W = randn((3, 4), torch.float32, rng, device), randn((5, 4), torch.float32, rng, device)
    with pytest.raises(ValueError, match="k must lie in"):
        T.per_example_topk_backward(G, X, W, 0)
    with pytest.raises(ValueError, match="k must lie in"):
        T.per_example_topk_backward(G, X, W, 6)
    with pytest.raises(ValueError, match="shapes do not fit"):
        T.per_example_topk_backward(G, X, W.t(), 2)
    with pytest.raises(TypeError, match=r"\(M, k\)"):
        T.per_example_backward_from_indices(G, X, W, torch.zeros(3, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="rows"):
        T.per_example_backward_from_indices(G, X, W, torch.zeros(2, 1, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match=r"\[1, out_features=5\]"):
        T.per_example_backward_from_indices(G, X, W, torch.zeros(3, 6, dtype=torch.int64, device=device))
    with pytest.raises(TypeError, match=r"\(k,\)"):
        T.unified_backward_from_indices(G, X, W, torch.zeros(3, 1, dtype=torch.int64, device=device))
    with pytest.raises(TypeError, match="int64"):
        T.unified_backward_from_indices(G, X, W, torch.zeros(2, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match=r"\[1, out_features=5\]"):
        T.unified_backward_from_indices(G, X, W, torch.zeros(0, dtype=torch.int64, device=device))
