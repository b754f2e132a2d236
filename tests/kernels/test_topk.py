"""kernels/topk.py against reference.select_topk: indices compared exactly."""

from __future__ import annotations

import math

import pytest
import torch

from kernel_checks import DTYPE_IDS, DTYPES, poisoned, randn
from meprop_triton import reference

pytestmark = pytest.mark.interpreter


def run(scores, k, config=None):
    from meprop_triton.kernels.topk import topk_indices

    n = scores.shape[0]
    out = poisoned((k,), torch.int64, scores.device)
    rest_out = poisoned((n - k,), torch.int64, scores.device)
    idx, rest = topk_indices(scores, k, return_rest=True, out=out, rest_out=rest_out, config=config)
    assert idx is out and rest is rest_out
    return idx, rest


def check(scores, k, config=None):
    idx, rest = run(scores, k, config)
    ref = reference.select_topk(torch.nan_to_num(scores.cpu(), nan=math.inf, posinf=math.inf), k)
    assert idx.dtype == torch.int64
    assert torch.equal(idx.cpu(), ref), f"k={k}: kernel {idx.tolist()[:20]} vs reference {ref.tolist()[:20]}"
    keep = torch.ones(scores.shape[0], dtype=torch.bool)
    keep[ref] = False
    assert torch.equal(rest.cpu(), keep.nonzero().flatten()), "complement differs"


def make_scores(kind: str, n: int, rng) -> torch.Tensor:
    if kind == "random":  # column scores are non-negative
        return torch.rand(n, generator=rng)
    if kind == "ties":  # many exact ties at every threshold
        return torch.randint(0, 4, (n,), generator=rng).float()
    if kind == "all_equal":
        return torch.full((n,), 2.5)
    if kind == "signed":  # any float order, -0.0 == +0.0, denormals
        s = torch.randn(n, generator=rng)
        s[:: 3] = 0.0
        s[1 :: 7] = -0.0
        s[2 :: 11] = 1e-40
        s[4 :: 13] = -1e-40
        return s
    if kind == "nonfinite":  # +inf and NaN (both count as +inf, tied in index order)
        s = torch.rand(n, generator=rng)
        s[1 :: 5] = math.inf
        s[3 :: 7] = math.nan
        s[5 :: 11] = -math.inf
        return s
    if kind == "narrow":  # keys that differ in their last 3 bits only (1024's ulp is 2**-13), with ties
        return 1024.0 + torch.randint(0, 8, (n,), generator=rng).float() * 2.0**-13
    raise ValueError(kind)


KINDS = ["random", "ties", "all_equal", "signed", "nonfinite", "narrow"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2, 5, 130, 1000, 2049])
def test_topk_matches_reference(n, kind, rng, device):
    scores = make_scores(kind, n, rng).to(device)
    for k in sorted({1, max(1, n - 1), n, max(1, n // 2), max(1, n // 20)}):
        check(scores, k)


@pytest.mark.parametrize("k", [1, 3277, 65535, 65536], ids=["k1", "k5pct", "k_out_minus_1", "k_out"])
def test_topk_65536(k, rng, device):
    """out = 65,536 (64 programs of the multi-program select): ties sit at the
    threshold, with NaN / inf (both +inf, in index order) and -0.0 among them."""
    scores = torch.randint(0, 1000, (65536,), generator=rng).float()
    scores[12345] = math.inf
    scores[40000] = math.nan
    scores[:: 97] = -0.0
    check(scores.to(device), k)


def _multi():
    from meprop_triton.kernels.topk import configs

    return next(c for c in configs() if c["MULTI"])


# The multi-program radix select (the rule's choice for n > MAX_RESIDENT, forced here at
# smaller n too): each size crosses the boundaries between programs (1024 keys each)
# differently: 4097 leaves one key in the last program, 12,345 an odd tail, 16,385 is the
# first n the rule gives it; every k class: 1, 16, small and not a multiple of 16,
# out - 1, out.
MULTI_CASES = [
    (4097, kind) for kind in ("random", "ties", "signed", "nonfinite")
] + [(8192, "ties"), (12345, "nonfinite"), (12345, "signed"), (16385, "narrow")]


@pytest.mark.parametrize("n,kind", MULTI_CASES, ids=[f"{n}-{kind}" for n, kind in MULTI_CASES])
def test_multi_program_matches_reference(n, kind, rng, device):
    from meprop_triton.kernels.topk import MAX_RESIDENT, pick_config

    assert pick_config(n)["MULTI"] == (n > MAX_RESIDENT)
    scores = make_scores(kind, n, rng).to(device)
    ks = (1, 16, 205, n - 1, n) if n == 4097 else (1, 205, n - 1, n)
    for k in ks:
        check(scores, k, _multi())


def test_multi_program_ties_everywhere(rng, device):
    """Integer-valued scores in {0, 1}: thousands of keys tie at the threshold, spread
    over every program, so the per-program tie counts and their scan decide the set
    (and, resident, over every compaction chunk)."""
    scores = torch.randint(0, 2, (8192,), generator=rng).float().to(device)
    for k in (1500, 4096, 6000):
        check(scores, k, _multi())
        check(scores, k)


def test_multi_program_strided_and_without_rest(rng, device):
    from meprop_triton.kernels.topk import topk_indices

    base = torch.rand(2 * 5000, generator=rng).to(device)
    check(base[::2], 321, _multi())
    check(base[::2], 321)
    scores = make_scores("ties", 4500, rng).to(device)
    for cfg in (_multi(), None):
        out = poisoned((77,), torch.int64, device)
        idx = topk_indices(scores, 77, out=out, config=cfg)
        assert idx is out
        assert torch.equal(idx.cpu(), reference.select_topk(scores.cpu(), 77))


def test_multi_program_repeatable(rng, device):
    """The atomic adds are on int32 counts: the same input gives the same output."""
    scores = make_scores("ties", 8192, rng).to(device)
    first = run(scores, 4000, _multi())
    again = run(scores, 4000, _multi())
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("n_out", [4100, 16400], ids=["resident", "multi-program"])
def test_unified_backward_selects_over_4096_units(n_out, rng, device):
    """The custom op (launches traced through wrap_triton where compiled) over more
    units than the top-k program finishes the scores' slices for: the finish kernel,
    then one resident program (grad_W's zeros written beside it) or, above
    MAX_RESIDENT, the multi-program selection (and ``zero_()``): the reference's set,
    and zeros in grad_W's other rows."""
    from meprop_triton.kernels.topk import MAX_RESIDENT, pick_config
    from meprop_triton.triton_ops import unified_topk_backward

    assert pick_config(n_out)["MULTI"] == (n_out > MAX_RESIDENT)
    M, n_in, k = 3, 5, 37
    G = torch.randn(M, n_out, generator=rng).to(device)
    G[:, n_out - 1] = 1e3
    X = torch.randn(M, n_in, generator=rng).to(device)
    W = torch.randn(n_out, n_in, generator=rng).to(device)
    gx, gw, gb, idx = unified_topk_backward(G, X, W, k, return_indices=True)
    assert torch.equal(idx.cpu(), reference.unified_topk_indices(G.cpu(), k))
    rest = torch.ones(n_out, dtype=torch.bool)
    rest[idx.cpu()] = False
    assert (gw.cpu()[rest] == 0).all()
    torch.testing.assert_close(gw.cpu()[idx.cpu()], G.cpu()[:, idx.cpu()].t() @ X.cpu())


def _configs():
    from meprop_triton.kernels.topk import configs

    return configs()


def _config_id(c) -> str:
    return f"B{c['BLOCK']}C{c['CHUNK']}{'-resident' if c['RESIDENT'] else ''}{'-multi' if c['MULTI'] else ''}"


@pytest.mark.parametrize("ci", range(len(_configs())), ids=[_config_id(c) for c in _configs()])
@pytest.mark.parametrize("n", [130, 2049, 4096, 16384])
def test_every_config(n, ci, rng, device):
    """Keys streamed block by block, held in registers, or spread over programs: the
    same indices; a resident config refuses more scores than it can hold."""
    from meprop_triton.kernels.topk import topk_indices

    cfg = _configs()[ci]
    scores = make_scores("ties" if n % 2 else "nonfinite", n, rng).to(device)
    if cfg["RESIDENT"] and n > cfg["BLOCK"]:
        with pytest.raises(ValueError, match="holds"):
            topk_indices(scores, 3, config=cfg)
        return
    for k in (1, max(1, n // 20), n - 1):
        check(scores, k, cfg)


def test_pick_config():
    """Resident keys in one program up to MAX_RESIDENT scores, in the smallest block that
    holds them; several programs beyond."""
    from meprop_triton.kernels.topk import MAX_FROM_PARTS, MAX_RESIDENT, pick_config

    assert MAX_RESIDENT >= 16384 and MAX_FROM_PARTS >= 4096
    for n, block in [(1, 4096), (4096, 4096), (4097, 8192), (8192, 8192), (8193, 16384), (16384, 16384)]:
        cfg = pick_config(n)
        assert cfg["RESIDENT"] and not cfg["MULTI"] and cfg["BLOCK"] == block, (n, cfg)
        assert cfg["BLOCK"] // (32 * cfg["num_warps"]) <= 16  # keys a thread
    for n in (MAX_RESIDENT + 1, 65536, 1 << 20):
        assert pick_config(n)["MULTI"] and not pick_config(n)["RESIDENT"]


def test_resident_zero_fills_beside_the_selection(rng, device):
    """``topk_indices(..., zero=)``: programs beside the resident one fill a poisoned
    tensor with zeros; the multi-program config zeroes it with ``zero_()``; either way
    the selection is as without it. A config not from ``configs()`` is refused."""
    from meprop_triton.kernels import topk

    scores = make_scores("ties", 6000, rng).to(device)
    for cfg in (None, _multi()):
        zero = poisoned((50_001,), torch.bfloat16, device)
        idx, rest = topk.topk_indices(scores, 300, return_rest=True, zero=zero, config=cfg)
        want_idx, want_rest = run(scores, 300, cfg)
        assert torch.equal(idx, want_idx) and torch.equal(rest, want_rest)
        assert (zero == 0).all()
    with pytest.raises(ValueError, match="zero must be a contiguous tensor"):
        topk.topk_indices(scores, 3, zero=poisoned((8, 2), torch.float32, device).t())
    with pytest.raises(TypeError, match="zero must be a tensor; got list"):
        topk.topk_indices(scores, 3, zero=[1.0])
    # the other programs would zero what the selecting one reads or writes
    with pytest.raises(ValueError, match="zero must not share memory"):
        topk.topk_indices(scores, 3, zero=scores[100:])
    out = torch.empty(3, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="zero must not share memory"):
        topk.topk_indices(scores, 3, out=out, zero=out.view(torch.float32))
    with pytest.raises(ValueError, match="one of topk.configs"):
        topk.topk_indices(scores, 3, config={**topk.pick_config(6000), "CHUNK": 512})


def test_ties_go_to_lower_index(device):
    scores = torch.tensor([1.0, 3.0, 2.0, 3.0, 3.0, 0.5, 3.0], device=device)
    idx, rest = run(scores, 3)
    assert idx.tolist() == [1, 3, 4] and rest.tolist() == [0, 2, 5, 6]
    idx, rest = run(scores, 5)
    assert idx.tolist() == [1, 2, 3, 4, 6]


def test_strided_scores(rng, device):
    base = torch.rand(2 * 700, generator=rng).to(device)
    check(base[::2], 70)


def test_without_rest(rng, device):
    from meprop_triton.kernels.topk import topk_indices

    scores = torch.rand(300, generator=rng).to(device)
    idx = topk_indices(scores, 17)
    assert torch.equal(idx.cpu(), reference.select_topk(scores.cpu(), 17))


def test_deterministic(rng, device):
    scores = make_scores("ties", 3000, rng).to(device)
    first = run(scores, 1500)
    again = run(scores, 1500)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("k", [0, 6, -1])
def test_rejects_bad_k(k, device):
    from meprop_triton.kernels.topk import topk_indices

    with pytest.raises(ValueError, match="k must lie in"):
        topk_indices(torch.rand(5, device=device), k)


def test_streaming_config_refuses_n_near_2_31(device):
    """The single-program streaming config counts its blocks in 32 bits: past
    ``2**31 - BLOCK`` scores the last step would wrap, so it refuses them before any
    work (the scores here are one value expanded, no memory); the default config
    takes the same n."""
    from meprop_triton.kernels.topk import configs, pick_config, topk_indices

    stream = next(c for c in configs() if not (c["RESIDENT"] or c["MULTI"]))
    step = max(stream["BLOCK"], stream["CHUNK"])
    for n in (2**31 - step + 1, 2**31 - 1):
        scores = torch.rand(1, device=device).expand(n)
        with pytest.raises(ValueError, match=rf"takes n up to 2\*\*31 - {step}; got n = {n}"):
            topk_indices(scores, 3, config=stream)
    assert pick_config(2**31 - 1)["MULTI"]


def test_rejects_non_fp32(device):
    from meprop_triton.kernels.topk import topk_indices

    with pytest.raises(TypeError, match="float32"):
        topk_indices(torch.rand(5, device=device).half(), 2)


# --- the scores' row slices finished inside the top-k program (topk_from_parts) -----------


def _grad_with(kind: str, M: int, n: int, dtype, rng, device) -> torch.Tensor:
    """A gradient whose column scores hold ties, signed zeros, inf or NaN by kind."""
    if kind == "ties":  # integer G: exact sums, many tied scores
        G = torch.randint(-2, 3, (M, n), generator=rng).float()
    else:
        G = torch.randn(M, n, generator=rng)
    if kind == "nonfinite":
        G[0, 1::5] = math.inf
        G[M // 2, 3::7] = math.nan
        G[M - 1, 2::9] = -math.inf
    if kind == "zeros":
        G[:, ::3] = 0.0
        G[:, 1::4] = -0.0
    return G.to(dtype).to(device)


FROM_PARTS_KINDS = ["random", "ties", "nonfinite", "zeros"]


def _from_parts_cases():
    """Every kind in every dtype up to 70 x 130; at 200 x 4096 (the wide selection's
    several chunks, about 15 s a case in the interpreter) each kind once, the dtypes in
    turn: G's dtype reaches the selection only through the fp32 scores, and its bias
    bits are checked in every dtype at the smaller shapes."""
    for M, n in [(1, 1), (5, 7), (70, 130), (200, 4096)]:
        for j, kind in enumerate(FROM_PARTS_KINDS):
            for d in range(len(DTYPES)) if n < 4096 else [j % len(DTYPES)]:
                yield pytest.param(M, n, kind, DTYPES[d], id=f"{M}-{n}-{kind}-{DTYPE_IDS[d]}")


# the interpreter runs the kernels in numpy, which warns on inf - inf (NaN, as on a GPU)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("M,n,kind,dtype", list(_from_parts_cases()))
def test_from_parts_equals_finish_then_topk(M, n, kind, dtype, rng, device):
    """``topk_from_parts`` over ``column_score_parts`` gives, bit for bit, the indices,
    complement and bias of ``column_scores_and_bias`` (its finish kernel) followed by
    ``topk_indices``, for one and several row slices, into poisoned buffers."""
    from meprop_triton.kernels.scores import column_score_parts, column_scores_and_bias
    from meprop_triton.kernels.topk import topk_from_parts, topk_indices

    G = _grad_with(kind, M, n, dtype, rng, device)
    for split in sorted({1, min(3, M), M}):
        scores, want_b = column_scores_and_bias(G, split=split)
        parts = column_score_parts(G, split=split)
        assert parts.shape[0] == 2 and parts.shape[2] == n
        for k in sorted({1, max(1, n // 3), max(1, n - 1), n}):
            want_idx, want_rest = topk_indices(scores, k, return_rest=True)
            bias = poisoned((n,), dtype, device)
            out, rest_out = poisoned((k,), torch.int64, device), poisoned((n - k,), torch.int64, device)
            idx, rest = topk_from_parts(parts, k, bias, return_rest=True, out=out, rest_out=rest_out)
            assert idx is out and rest is rest_out
            assert torch.equal(idx, want_idx) and torch.equal(rest, want_rest), (split, k)
            # bit for bit, NaN and the sign of zero included
            assert torch.equal(bias.view(torch.int16 if dtype != torch.float32 else torch.int32),
                               want_b.view(torch.int16 if dtype != torch.float32 else torch.int32)), (split, k)
            assert torch.equal(topk_from_parts(parts, k, bias), want_idx)


@pytest.mark.parametrize("numel", [1, 4095, 100_003], ids=["one", "under-a-block", "several-steps"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_from_parts_zero_fills_beside_the_selection(numel, dtype, rng, device):
    """``zero=``: the programs beside the selecting one fill a NaN-poisoned tensor with
    zeros, every element (several grid-stride steps at 100,003 elements, 25 blocks, on
    at most 2 programs per SM: 8 off CUDA, 264 on an H200), and the
    selection and bias come out as without it."""
    from meprop_triton.kernels import topk
    from meprop_triton.kernels.scores import column_score_parts

    G = randn((37, 300), torch.float32, rng, device)
    parts = column_score_parts(G, split=3)
    bias, want_b = poisoned((300,), torch.float32, device), poisoned((300,), torch.float32, device)
    want_idx, want_rest = topk.topk_from_parts(parts, 41, want_b, return_rest=True)
    zero = poisoned((numel,), dtype, device)
    idx, rest = topk.topk_from_parts(parts, 41, bias, return_rest=True, zero=zero)
    assert torch.equal(idx, want_idx) and torch.equal(rest, want_rest) and torch.equal(bias, want_b)
    assert (zero == 0).all()  # 100,003: 25 blocks, so every program loops (at most 2 per SM)
    with pytest.raises(ValueError, match="zero must be a contiguous tensor"):
        topk.topk_from_parts(parts, 41, bias, zero=poisoned((8, 2), dtype, device).t())


def test_from_parts_matches_the_reference_with_ties(rng, device):
    """Integer G: the scores are exact, so the selection is the reference's, ties to the
    lower index; the bias is G's column sums."""
    from meprop_triton.kernels.scores import column_score_parts
    from meprop_triton.kernels.topk import topk_from_parts

    G = torch.randint(-2, 3, (96, 1000), generator=rng).float().to(device)
    bias = poisoned((1000,), torch.float32, device)
    for k in (1, 17, 500, 999, 1000):
        idx = topk_from_parts(column_score_parts(G, split=4), k, bias)
        assert torch.equal(idx.cpu(), reference.unified_topk_indices(G.cpu(), k))
        assert torch.equal(bias.cpu(), G.cpu().sum(0))


def test_from_parts_rejects_bad_arguments(device):
    from meprop_triton.kernels.scores import column_score_parts
    from meprop_triton.kernels.topk import MAX_FROM_PARTS, topk_from_parts

    parts = torch.zeros(2, 3, 10, device=device)
    bias = torch.empty(10, device=device)
    with pytest.raises(TypeError, match=r"contiguous \(2, split, n\) float32"):
        topk_from_parts(parts[0], 2, bias)
    with pytest.raises(TypeError, match="float32"):
        topk_from_parts(parts.double(), 2, bias)
    with pytest.raises(ValueError, match=f"1 to {MAX_FROM_PARTS} columns"):
        n = MAX_FROM_PARTS + 1
        topk_from_parts(torch.zeros(2, 1, n, device=device), 2, torch.empty(n, device=device))
    with pytest.raises(ValueError, match=r"bias must be a contiguous \(10,\)"):
        topk_from_parts(parts, 2, torch.empty(9, device=device))
    with pytest.raises(ValueError, match=r"k must lie in \[1, 10\]"):
        topk_from_parts(parts, 11, bias)
    with pytest.raises(ValueError, match="rows and columns"):
        column_score_parts(torch.zeros(0, 5, device=device))
