"""kernels/topk.py against reference.select_topk: indices compared exactly."""

from __future__ import annotations

import math

import pytest
import torch

from kernel_checks import poisoned
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
        return s
    raise ValueError(kind)


KINDS = ["random", "ties", "all_equal", "signed", "nonfinite"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2, 5, 130, 1000, 2049])
def test_topk_matches_reference(n, kind, rng, device):
    scores = make_scores(kind, n, rng).to(device)
    for k in sorted({1, max(1, n - 1), n, max(1, n // 2), max(1, n // 20)}):
        check(scores, k)


@pytest.mark.parametrize("k", [1, 3277, 65535], ids=["k1", "k5pct", "k_out_minus_1"])
def test_topk_65536(k, rng, device):
    """out = 65,536: 64 blocks per pass; ties sit at the threshold."""
    scores = torch.randint(0, 1000, (65536,), generator=rng).float().to(device)
    scores[12345] = math.inf
    check(scores, k)


def _configs():
    from meprop_triton.kernels.topk import configs

    return configs()


@pytest.mark.parametrize("ci", range(len(_configs())), ids=[f"B{c['BLOCK']}{'-resident' if c['RESIDENT'] else ''}" for c in _configs()])
@pytest.mark.parametrize("n", [130, 2049, 4096, 16384])
def test_every_config(n, ci, rng, device):
    """Keys streamed block by block or held in registers: the same indices; a resident
    config refuses more scores than it can hold."""
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
    """Resident keys up to MAX_RESIDENT scores, streamed beyond."""
    from meprop_triton.kernels.topk import MAX_RESIDENT, pick_config

    assert MAX_RESIDENT >= 4096
    assert pick_config(1)["RESIDENT"] and pick_config(1)["BLOCK"] == MAX_RESIDENT
    assert pick_config(MAX_RESIDENT)["RESIDENT"]
    assert not pick_config(MAX_RESIDENT + 1)["RESIDENT"]


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


def test_rejects_non_fp32(device):
    from meprop_triton.kernels.topk import topk_indices

    with pytest.raises(TypeError, match="float32"):
        topk_indices(torch.rand(5, device=device).half(), 2)
