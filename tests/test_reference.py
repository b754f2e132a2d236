"""``meprop_triton.reference`` (the oracle every kernel is checked against) against an
independent fp64 numpy statement of the definition (the ``oracle`` fixture)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from meprop_triton import reference
from meprop_triton._validation import resolve_k

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]
SHAPES = [  # (M, out)
    pytest.param((1, 1), id="M1-out1"),
    pytest.param((1, 37), id="M1-out37"),
    pytest.param((7, 123), id="M7-out123"),
    pytest.param((64, 7), id="M64-out7"),
    pytest.param((123, 64), id="M123-out64"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_column_scores(shape, dtype, oracle, gen):
    M, out_f = shape
    G = torch.randn(M, out_f, dtype=dtype, generator=gen)
    s = reference.column_scores(G)
    assert s.shape == (out_f,) and s.dtype == dtype
    ref = np.abs(G.double().numpy()).sum(0)
    oracle.assert_within_bound(s, ref, ref, M, what="scores")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_column_scores_accumulate_in_fp32(dtype):
    # 4096 ones: a bf16/fp16 running sum would stall at 256 / 2048.
    G = -torch.ones(4096, 3, dtype=dtype)
    s = reference.column_scores(G)
    assert s.dtype == torch.float32
    assert s.tolist() == [4096.0] * 3


def test_column_scores_nonfinite_is_inf():
    G = torch.ones(3, 5)
    G[1, 0] = math.nan
    G[0, 2] = -math.inf
    G[2, 3] = math.inf
    G[0, 4] = math.nan
    G[1, 4] = math.inf
    s = reference.column_scores(G)
    assert s.tolist() == [math.inf, 3.0, math.inf, math.inf, math.inf]


def test_column_scores_of_empty_batch_are_zero():
    s = reference.column_scores(torch.empty(0, 6))
    assert s.shape == (6,) and torch.equal(s, torch.zeros(6))


@pytest.mark.parametrize(
    "scores,k,expected",
    [
        ([3.0, 1.0, 3.0, 2.0], 1, [0]),
        ([3.0, 1.0, 3.0, 2.0], 2, [0, 2]),
        ([3.0, 1.0, 3.0, 2.0], 3, [0, 2, 3]),
        ([1.0, 1.0, 1.0, 1.0, 1.0], 2, [0, 1]),
        ([0.0, 5.0, math.inf, 5.0, math.inf], 1, [2]),
        ([0.0, 5.0, math.inf, 5.0, math.inf], 3, [1, 2, 4]),
        ([2.0, 4.0, 1.0], 3, [0, 1, 2]),
    ],
    ids=["k1", "tie-k2", "k3", "all-equal", "two-inf-k1", "inf-then-tie", "k=out"],
)
def test_select_topk_ties_to_lower_index(scores, k, expected):
    idx = reference.select_topk(torch.tensor(scores), k)
    assert idx.dtype == torch.int64
    assert idx.tolist() == expected


def test_select_topk_many_ties_large():
    # Many equal scores: a non-stable sort would pick an arbitrary subset.
    scores = torch.zeros(1000)
    scores[::7] = 1.0
    idx = reference.select_topk(scores, 200)
    expected = list(range(0, 1000, 7)) + [i for i in range(1000) if i % 7][: 200 - 143]
    assert idx.tolist() == sorted(expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 0.1, 0.5, "out-1", "out"], ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_unified_topk_indices_exact(shape, k, dtype, oracle, gen):
    M, out_f = shape
    k = {"out-1": max(1, out_f - 1), "out": out_f}.get(k, k)
    ku = oracle.k_units(k, out_f)
    G = oracle.grad_output((M,), out_f, dtype=dtype, generator=gen)
    idx = reference.unified_topk_indices(G, ku)
    ref = oracle.grads(torch.zeros(M, 1, dtype=dtype), torch.zeros(out_f, 1, dtype=dtype), G, ku)
    np.testing.assert_array_equal(idx.numpy(), ref["selected"])
    assert idx.dtype == torch.int64 and torch.all(idx[1:] > idx[:-1])  # sorted, unique


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 3, 0.25], ids=str)
@pytest.mark.parametrize("size", [(1, 1, 1), (7, 37, 23), (123, 16, 64), (5, 123, 9)],
                         ids=lambda s: "M{}-in{}-out{}".format(*s))
def test_unified_backward(size, k, dtype, oracle, gen):
    M, in_f, out_f = size
    ku = oracle.k_units(k, out_f)
    X = torch.randn(M, in_f, dtype=dtype, generator=gen)
    W = torch.randn(out_f, in_f, dtype=dtype, generator=gen)
    G = oracle.grad_output((M,), out_f, dtype=dtype, generator=gen)
    ref = oracle.grads(X, W, G, ku)
    idx = torch.from_numpy(ref["selected"])
    gx, gw, gb = reference.unified_backward(G, X, W, idx)
    oracle.assert_within_bound(gx, ref["grad_x"], ref["bound_x"], ku, what="grad_x")
    oracle.assert_within_bound(gw, ref["grad_w"], ref["bound_w"], M, what="grad_w")
    oracle.assert_within_bound(gb, ref["grad_b"], ref["bound_b"], M, what="grad_b")
    np.testing.assert_array_equal(oracle.selected_rows(gw), ref["selected"])


def test_unified_backward_need_flags(gen):
    X = torch.randn(4, 5, generator=gen)
    W = torch.randn(6, 5, generator=gen)
    G = torch.randn(4, 6, generator=gen)
    idx = torch.tensor([1, 4])
    for need in [(True, False, False), (False, True, False), (False, False, True)]:
        got = reference.unified_backward(
            G, X, W, idx, need_input=need[0], need_weight=need[1], need_bias=need[2]
        )
        assert [g is not None for g in got] == list(need)
        got = reference.dense_backward(
            G, X, W, need_input=need[0], need_weight=need[1], need_bias=need[2]
        )
        assert [g is not None for g in got] == list(need)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_backward(dtype, oracle, gen):
    M, in_f, out_f = 37, 19, 23
    X = torch.randn(M, in_f, dtype=dtype, generator=gen)
    W = torch.randn(out_f, in_f, dtype=dtype, generator=gen)
    G = torch.randn(M, out_f, dtype=dtype, generator=gen)
    ref = oracle.grads(X, W, G, out_f)
    gx, gw, gb = reference.dense_backward(G, X, W)
    oracle.assert_within_bound(gx, ref["grad_x"], ref["bound_x"], out_f, what="grad_x")
    oracle.assert_within_bound(gw, ref["grad_w"], ref["bound_w"], M, what="grad_w")
    oracle.assert_within_bound(gb, ref["grad_b"], ref["bound_b"], M, what="grad_b")


@pytest.mark.parametrize(
    "k,out_f,expected",
    [(1, 10, 1), (7, 10, 7), (10, 10, 10), (500, 10, 10), (0.1, 37, 4), (0.25, 123, 31),
     (1.0, 7, 7), (0.07, 100, 7), (0.29, 100, 29), (1e-9, 10, 1), (0.5, 1, 1), (1 / 3, 9, 3),
     # float32 rounding is noise too, not an excess: np.float32(0.1) is 0.10000000149...
     (np.float32(0.1), 100, 10), (np.float32(0.3), 10, 3), (np.float32(0.05), 4096, 205),
     (torch.tensor(0.3).item(), 10, 3), (0.301, 10, 4), (0.30001, 1000, 301)],
    ids=lambda v: repr(v),
)
def test_resolve_k(k, out_f, expected, oracle):
    assert oracle.k_units(k, out_f) == expected  # the oracle agrees with the table
    got = resolve_k(k, out_f)
    assert type(got) is int and got == expected


def test_resolve_k_accepts_numpy_scalars():
    assert resolve_k(np.int64(3), 10) == 3
    assert resolve_k(np.float32(0.5), 10) == 5


@pytest.mark.parametrize("chunk", [1, 64, 1000], ids=lambda c: f"chunk{c}")
def test_column_scores_chunked_path(chunk, monkeypatch, oracle, gen):
    """The row-block accumulation (large M) gives the same scores, NaN/inf included."""
    monkeypatch.setattr(reference, "_SCORE_CHUNK", chunk)
    G = torch.randn(123, 7, generator=gen)
    G[100, 2] = math.nan
    G[5, 4] = -math.inf
    s = reference.column_scores(G)
    ref = np.abs(G.double().numpy()).sum(0)
    assert s[2] == math.inf and s[4] == math.inf
    finite = [0, 1, 3, 5, 6]
    oracle.assert_within_bound(s[finite], ref[finite], ref[finite], 123, what="scores")


@pytest.mark.parametrize("dtype", DTYPES)
def test_unified_backward_lazily_zeroed_weight_grad(dtype, monkeypatch, oracle, gen):
    """The large-block (calloc'd) zero weight gradient: untouched rows read as exact zeros
    and the result behaves as an ordinary tensor."""
    monkeypatch.setattr(reference, "_LAZY_ZEROS_BYTES", 0)
    M, in_f, out_f = 9, 33, 40
    X = torch.randn(M, in_f, dtype=dtype, generator=gen)
    W = torch.randn(out_f, in_f, dtype=dtype, generator=gen)
    G = oracle.grad_output((M,), out_f, dtype=dtype, generator=gen)
    ref = oracle.grads(X, W, G, 6)
    _, gw, _ = reference.unified_backward(G, X, W, torch.from_numpy(ref["selected"]))
    assert gw.dtype == dtype and gw.shape == (out_f, in_f) and gw.is_contiguous()
    oracle.assert_within_bound(gw, ref["grad_w"], ref["bound_w"], M, what="grad_w")
    np.testing.assert_array_equal(oracle.selected_rows(gw), ref["selected"])
    gw.add_(1)  # writable, and owns its memory
    assert torch.equal(gw[~torch.from_numpy(ref["mask"])], torch.ones(out_f - 6, in_f, dtype=dtype))


def test_select_topk_unsorted_is_the_same_set(gen):
    """``sort=False`` (what the dense-gradient CPU backward takes) gives the same set,
    on the topk route and on the stable-sort route that ties take."""
    scores = torch.rand(300, generator=gen)
    tied = torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0, 3.0, 0.5])
    for s, k in ((scores, 1), (scores, 37), (scores, 299), (tied, 2), (tied, 3), (tied, 6)):
        got = reference.select_topk(s, k, sort=False)
        assert torch.equal(got.sort().values, reference.select_topk(s, k))


@pytest.mark.parametrize("sort", [True, False], ids=["sorted", "unsorted"])
def test_select_topk_takes_nonfinite_scores_as_inf(sort, gen):
    """Raw scores (what the CPU backward passes: NaN and inf not yet mapped) give the
    set of the mapped ones: NaN and inf both count as +inf, ties to the lower index,
    even where ``topk`` alone would rank NaN above inf or see no tie between NaNs; the
    caller's scores are left as they were."""
    base = torch.rand(50, generator=gen) + 1.0
    cases = []
    for spots in ([(7, math.nan)], [(9, math.inf), (3, math.nan)], [(4, math.nan), (40, math.nan)],
                  [(30, math.nan), (2, math.inf), (11, math.nan)]):
        s = base.clone()
        for i, v in spots:
            s[i] = v
        for k in (1, 2, len(spots), len(spots) + 1, 20):
            cases.append((s, k))
    for s, k in cases:
        before = s.clone()
        got = reference.select_topk(s, k, sort=sort)
        mapped = torch.nan_to_num(s, nan=math.inf, posinf=math.inf)
        expected = torch.sort(mapped, descending=True, stable=True).indices[:k]
        assert torch.equal(got.sort().values, expected.sort().values), (s, k)
        if sort:
            assert torch.equal(got, expected.sort().values)
        assert torch.equal(s.isnan(), before.isnan()) and torch.equal(s.nan_to_num(), before.nan_to_num())


def test_select_topk_keeps_minus_inf_below_every_finite_score():
    """Only NaN and +inf are mapped: -inf stays below the most negative finite score."""
    s = torch.tensor([-math.inf, torch.finfo(torch.float32).min, 1.0, math.nan, -math.inf])
    assert reference.select_topk(s, 3).tolist() == [1, 2, 3]
    assert reference.select_topk(s, 4).tolist() == [0, 1, 2, 3]


# --- the per-example products' helpers: same numbers as the plain torch calls ----------


@pytest.mark.parametrize("n_units", [1, 2, 500, 1 << 15, (1 << 15) + 1, 70_000])
@pytest.mark.parametrize("n", [0, 1, 4000, 32_767, 32_768, 52_480])
@pytest.mark.parametrize("route", ["as-is", "torch-only"])
def test_stable_order_is_a_stable_int64_sort(n, n_units, route, monkeypatch, gen):
    # numpy's 16-bit radix sort below 32,768 elements, torch's int16 / int32 sort above
    # (or everywhere, "torch-only"): the permutation of a stable sort of the int64 values
    if route == "torch-only":
        monkeypatch.setattr(reference, "_RADIX_SORT_MIN", 0)
    units = torch.randint(0, n_units, (n,), generator=gen)
    if n:
        units[n // 2] = n_units - 1  # the widest value occurs, and equal keys
        units[0] = n_units - 1
    order = reference._stable_order(units, n_units)
    assert order.dtype == torch.int64
    assert torch.equal(order, torch.sort(units, stable=True).indices)


def _rowwise_topk_definition(G: torch.Tensor, k: int) -> np.ndarray:
    """Each row's k largest |G|, NaN and inf as +inf, ties to the lower index: a stable
    descending argsort in fp64, indices sorted."""
    a = np.abs(G.detach().double().numpy())
    a[~np.isfinite(a)] = np.inf
    return np.sort(np.argsort(-a, axis=1, kind="stable")[:, :k], axis=1)


@pytest.mark.parametrize(
    "shape_k",
    [(50, 500, 20), (50, 500, 80), (50, 500, 499), (50, 500, 5), (3, 64, 2), (40, 7, 3), (0, 30, 4), (257, 1000, 100),
     (6, 70_000, 2_000)],
    ids=lambda s: "M%d-out%d-k%d" % s,
)
@pytest.mark.parametrize("route", ["as-is", "torch-only"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_per_example_topk_routes_give_the_definitions_sets(shape_k, route, dtype, monkeypatch, gen):
    # numpy's partition of the packed keys where 64 k > out (torch's topk otherwise, or
    # everywhere, "torch-only"): each row's set of the definition, and sorted ascending
    # either way on the numpy route
    M, out, k = shape_k
    if route == "torch-only":
        monkeypatch.setattr(reference, "_numpy_may_read", lambda t: False)
    G = torch.randn(M, out, generator=gen).to(dtype)
    if M >= 6:
        G[1] = 0.0  # a row of ties
        G[2, :: 3] = 0.5  # ties across the k-th place
        G[3, 5], G[3, out - 1], G[4, 2], G[4, 0] = math.nan, math.inf, -math.inf, -math.nan
        G[5, 1::2] = -0.0
        G[5, ::4] = 1e-40 if dtype == torch.float32 else 0.0  # subnormal
        if k + 3 < out:  # k infs and a NaN after them: NaN counts as +inf, the lower indices win
            G[0, :k] = math.inf
            G[0, k + 1], G[0, k + 3] = math.nan, -math.inf
    want = _rowwise_topk_definition(G, k)
    for sort in (True, False):
        got = reference.per_example_topk_indices(G, k, sort=sort)
        assert got.shape == (M, k) and got.dtype == torch.int64
        if route == "as-is" and 64 * k > out:
            assert torch.equal(got, torch.from_numpy(want)) and got.is_contiguous()  # sorted whatever sort says
        else:
            assert np.array_equal(np.sort(got.numpy(), axis=1), want)
    # a strided gradient and one that requires grad (a double backward's) give the same
    Gt = G.t().contiguous().t().requires_grad_()
    got = reference.per_example_topk_indices(Gt, k)
    assert np.array_equal(got.numpy(), want) and got.is_contiguous()
    if M:  # every row the same (an expanded gradient, stride 0)
        assert np.array_equal(reference.per_example_topk_indices(G[2:3].expand(M, out), k).numpy(),
                              np.repeat(want[2:3], M, axis=0))


def test_per_example_topk_takes_numpy_only_where_it_pays():
    a = torch.rand(50, 500)
    assert reference._numpy_row_topk(a, 20) is not None  # an MNIST layer at k = 20
    assert reference._numpy_row_topk(a, 7) is None  # 64 k <= out: torch's partial sort
    assert reference._numpy_row_topk(a, 500) is None
    assert reference._numpy_row_topk(a.to("meta"), 20) is None
    assert reference._numpy_row_topk(a.double(), 20) is None  # fp32 keys only
    seen = []
    torch.func.vmap(lambda r: (seen.append(reference._numpy_row_topk(r[None], 20)), r)[1])(a)
    assert seen == [None]  # a batched tensor under torch.func: torch's topk


@pytest.mark.parametrize("default", [torch.float64, torch.float16, torch.bfloat16], ids=["fp64", "fp16", "bf16"])
def test_per_example_selection_under_another_default_dtype_or_device(default):
    # torch.rand draws in the default dtype (the torch route then, as before); a default
    # device (here meta) does not reach the CPU tensors made inside
    before = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        idx = reference.per_example_random_indices(50, 501, 20, generator=torch.Generator().manual_seed(1))
        assert idx.shape == (50, 20) and bool((idx.diff(dim=1) > 0).all()) and int(idx.max()) < 501
    finally:
        torch.set_default_dtype(before)
    G = torch.randn(50, 500)
    want = reference.per_example_topk_indices(G, 20)
    with torch.device("meta"):
        assert torch.equal(reference.per_example_topk_indices(G, 20), want)
        assert reference.per_example_random_indices(50, 500, 20, device="cpu").device.type == "cpu"


@pytest.mark.parametrize("M,out,k", [(50, 500, 20), (13, 40, 6), (4, 300, 299)])
def test_per_example_random_numpy_route_draws_the_sets_of_topk(M, out, k, monkeypatch):
    # the same seed gives each row the same set on both routes (the k largest draws;
    # the routes could differ only where two draws tie at the k-th place)
    got = reference.per_example_random_indices(M, out, k, generator=torch.Generator().manual_seed(5), sort=False)
    monkeypatch.setattr(reference, "_numpy_may_read", lambda t: False)
    want = reference.per_example_random_indices(M, out, k, generator=torch.Generator().manual_seed(5))
    assert torch.equal(got.sort(dim=1).values, want)
    assert torch.equal(got, want)  # the numpy route returns them sorted


def test_pairs_by_unit_groups_rows_in_order(gen):
    M, out, k = 50, 500, 80
    idx = torch.rand(M, out, generator=gen).topk(k, dim=1).indices  # any order within a row
    units, rows, order = reference._pairs_by_unit(idx, out)
    expected_units, expected_order = torch.sort(idx.reshape(-1), stable=True)
    assert torch.equal(units, expected_units)
    assert torch.equal(order, expected_order)
    assert torch.equal(rows, expected_order // k)
    assert torch.equal(idx.reshape(-1)[order], units)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_bag_sums_equal_embedding_bag(dtype, gen):
    # the table's last row included: a padding_idx of -1 would drop it
    import torch.nn.functional as F

    table = torch.randn(9, 13, generator=gen).to(dtype)
    rows2d = torch.randint(0, 9, (6, 4), generator=gen)
    rows2d[:, 0] = 8
    weights = torch.randn(6, 4, generator=gen)  # fp32: converted to the table's dtype
    got = reference._bag_sums(rows2d, table, None, weights)
    want = F.embedding_bag(rows2d, table, None, mode="sum", per_sample_weights=weights.to(dtype))
    assert torch.equal(got, want)
    flat, w = rows2d.reshape(-1), weights.reshape(-1).to(dtype)
    offsets = torch.tensor([0, 0, 5, 5, 11, 24])  # empty bags, and one at the end
    got = reference._bag_sums(flat, table, offsets, w)
    want = F.embedding_bag(flat, table, offsets, mode="sum", per_sample_weights=w)
    assert torch.equal(got, want)
    assert torch.equal(got[[0, 2, 5]], torch.zeros(3, 13, dtype=dtype))
    empty = reference._bag_sums(torch.zeros(0, 4, dtype=torch.long), table, None, torch.zeros(0, 4))
    assert empty.shape == (0, 13)


@pytest.mark.parametrize("grad_mode", [False, True], ids=["no_grad", "grad"])
def test_bag_sums_with_a_table_that_requires_grad(grad_mode, gen):
    # a weight or an activation as the table: the same numbers, and with grad enabled
    # the same gradients (the create_graph=True backward records this op)
    import torch.nn.functional as F

    table = torch.randn(9, 13, generator=gen, requires_grad=True)
    rows = torch.randint(0, 9, (6, 4), generator=gen)
    weights = torch.randn(6, 4, generator=gen, requires_grad=True)
    with torch.set_grad_enabled(grad_mode):
        got = reference._bag_sums(rows, table, None, weights)
        want = F.embedding_bag(rows, table, None, mode="sum", per_sample_weights=weights)
    assert torch.equal(got, want)
    assert got.requires_grad == grad_mode
    if grad_mode:
        up = torch.randn(6, 13, generator=gen)
        assert all(
            torch.equal(a, b)
            for a, b in zip(torch.autograd.grad(got, (table, weights), up),
                            torch.autograd.grad(want, (table, weights), up))
        )


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # Deprecation- or FutureWarning
def test_bag_sums_forward_ad_as_embedding_bag(gen):  # (torch's forward-AD code scripts)
    # a dual table under no_grad: whatever F.embedding_bag does (an error or a tangent),
    # never a silently dropped tangent
    import torch.autograd.forward_ad as fwAD
    import torch.nn.functional as F

    table, tangent = torch.randn(9, 13, generator=gen), torch.randn(9, 13, generator=gen)
    rows = torch.randint(0, 9, (6, 4), generator=gen)
    weights = torch.randn(6, 4, generator=gen)

    def outcome(fn):
        with torch.no_grad(), fwAD.dual_level():
            try:
                out = fn(fwAD.make_dual(table, tangent))
            except (NotImplementedError, RuntimeError) as e:
                return type(e)
            return fwAD.unpack_dual(out).tangent

    got = outcome(lambda t: reference._bag_sums(rows, t, None, weights))
    want = outcome(lambda t: F.embedding_bag(rows, t, None, mode="sum", per_sample_weights=weights))
    if isinstance(want, type):
        assert got is want
    else:
        assert want is not None and got is not None and torch.equal(got, want)


def test_pairs_by_unit_traced_by_make_fx_is_not_a_constant(gen):
    # make_fx in its default (real) mode sees plain CPU tensors: the grouping must be a
    # recorded op, not numpy's result baked into the graph
    from torch.fx.experimental.proxy_tensor import make_fx

    a, b = (torch.rand(7, 50, generator=gen).topk(5, dim=1).indices for _ in range(2))
    traced = make_fx(lambda i: reference._pairs_by_unit(i, 50))(a)
    for got, want in zip(traced(b), reference._pairs_by_unit(b, 50)):
        assert torch.equal(got, want)
