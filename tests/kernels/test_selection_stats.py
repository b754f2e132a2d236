"""meSimp's selection statistics on the Triton backend (the interpreter on a CPU): the
counters a MePropLinear keeps equal an independent count from the selected indices."""

from __future__ import annotations

import pytest
import torch

from kernel_checks import randn
from meprop_triton import MePropLinear, reference

pytestmark = pytest.mark.interpreter


def _count(sets, out):
    hits = torch.zeros(out, dtype=torch.int64)
    for row_set in sets:
        for j in set(row_set.tolist()):
            hits[j] += 1
    return hits


@pytest.mark.parametrize("unified", [True, False], ids=["unified", "per-example"])
def test_topk_statistics(unified, rng, device):
    layer = MePropLinear(16, 70, k=9, unified=unified, backend="triton", track_selection=True,
                         device=device)
    assert layer.selection_counts.device.type == torch.device(device).type
    hits, rows = torch.zeros(70, dtype=torch.int64), 0
    for _ in range(2):
        x = randn((3, 5, 16), torch.float32, rng, device).requires_grad_()
        g = randn((3, 5, 70), torch.float32, rng, device)
        layer(x).backward(g)
        g2 = g.reshape(-1, 70).cpu()
        if unified:
            sets = [reference.unified_topk_indices(g2, 9)] * 15
        else:
            sets = list(reference.per_example_topk_indices(g2, 9))
        hits += _count(sets, 70)
        rows += 15
    stats = layer.selection_stats()
    assert stats.rows == rows
    assert torch.equal(stats.hits.cpu(), hits)


@pytest.mark.parametrize("unified", [True, False], ids=["unified", "per-example"])
def test_random_statistics(unified, rng, device):
    """Random-k on the Triton backend: k units per row, counted once each."""
    layer = MePropLinear(8, 40, k=6, unified=unified, selection="random", backend="triton",
                         track_selection=True, device=device)
    x = randn((11, 8), torch.float32, rng, device).requires_grad_()
    layer(x).backward(randn((11, 40), torch.float32, rng, device))
    stats = layer.selection_stats()
    assert stats.rows == 11 and int(stats.hits.sum()) == 66 and int(stats.hits.max()) <= 11
    if unified:
        assert set(stats.hits.unique().tolist()) <= {0, 11}


def test_no_selection_without_weight_or_input_gradient(rng, device):
    """Only the bias needs a gradient: no selection is made and nothing is counted."""
    layer = MePropLinear(8, 40, k=6, backend="triton", track_selection=True, device=device)
    layer.weight.requires_grad_(False)
    x = randn((5, 8), torch.float32, rng, device)
    layer(x).sum().backward()
    assert layer.selection_stats().rows == 0
