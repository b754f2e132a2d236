"""meProp layers under torch.distributed on CPU: 2-rank gloo DistributedDataParallel and
FSDP2 (``fully_shard``).

Semantics checked: each rank selects on its own local gradient (its own top-k units); the
all-reduced (DDP) or reduce-scattered (FSDP2) gradient is the mean of the ranks' meProp
gradients, so its non-zero rows are the union of the ranks' kept units: up to
``world_size x k`` rows per layer. ``sparse_grad=True`` is refused under both, with an
error naming ``sparse_grad=False``, before any work.

One spawn of two worker processes runs every scenario (each in its own try, so one
failure does not hide the others) and saves what it saw; the tests check those records.
A deadline kills the workers, so a stuck collective cannot hang the run.
"""

from __future__ import annotations

import copy
import os
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from meprop_triton import MePropLinear

WORLD = 2
DEADLINE_S = 120  # the whole spawn, start-up included; a normal run takes well under 15 s
PG_TIMEOUT_S = 45  # a collective that waits longer than this raises in the worker
STEPS = 4
K1, K2 = 4, 3  # units kept by the two meProp layers (of 32 and 16)

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


def make_model(*, k1=K1, k2=K2, sparse_grad=False, dense=False) -> nn.Sequential:
    """Two meProp layers (or nn.Linear with ``dense=True``) and a dense head, fp64, the
    same initial weights on every rank and in every call."""
    torch.manual_seed(0)
    if dense:
        l1, l2 = nn.Linear(12, 32), nn.Linear(32, 16)
    else:
        l1 = MePropLinear(12, 32, k=k1, sparse_grad=sparse_grad)
        l2 = MePropLinear(32, 16, k=k2, sparse_grad=sparse_grad)
    return nn.Sequential(l1, nn.Tanh(), l2, nn.Tanh(), nn.Linear(16, 3)).double()


MEPROP = ("0", "2")  # the meProp layers' names in make_model


def rank_batch(rank: int, step: int):
    """Each rank its own data, different at every step."""
    gen = torch.Generator().manual_seed(1000 * rank + step)
    return (
        torch.randn(8, 12, generator=gen, dtype=torch.float64),
        torch.randn(8, 3, generator=gen, dtype=torch.float64),
    )


def loss_of(model, x, t):
    return nn.functional.mse_loss(model(x), t)


def local_grads(model: nn.Module, x, t) -> dict:
    """The meProp layers' gradients of a plain (undistributed) copy on this rank's data."""
    twin = copy.deepcopy(model)
    twin.zero_grad(set_to_none=True)
    loss_of(twin, x, t).backward()
    return {name: twin.get_submodule(name).weight.grad.clone() for name in MEPROP}


def weights(model: nn.Module) -> dict:
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


# --- scenarios, run in each worker ---------------------------------------------------------


def ddp_dense(rank):
    """DDP with dense meProp gradients: per step the local and the all-reduced gradients."""
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    steps = []
    for step in range(STEPS):
        x, t = rank_batch(rank, step)
        local = local_grads(model, x, t)
        opt.zero_grad(set_to_none=True)
        loss_of(ddp, x, t).backward()
        reduced = {name: model.get_submodule(name).weight.grad.clone() for name in MEPROP}
        steps.append({"local": local, "reduced": reduced})
        opt.step()
    return {"steps": steps, "final": weights(model), "initial": weights(make_model())}


def ddp_sparse(rank):
    """sparse_grad=True under DDP: the refusal, nothing changed by it, then the same
    layers with sparse_grad=False train."""
    model = make_model(sparse_grad=True)
    ddp = nn.parallel.DistributedDataParallel(model)
    before = weights(model)
    x, t = rank_batch(rank, 0)
    try:
        loss_of(ddp, x, t).backward()
        error = None
    except RuntimeError as e:
        error = str(e)
    unchanged = all(torch.equal(before[n], p) for n, p in weights(model).items())
    grads_none = all(p.grad is None for p in model.parameters())
    for name in MEPROP:
        model.get_submodule(name).sparse_grad = False
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for step in range(STEPS):
        x, t = rank_batch(rank, step)
        opt.zero_grad(set_to_none=True)
        loss_of(ddp, x, t).backward()
        opt.step()
    return {
        "error": error, "unchanged": unchanged, "grads_none": grads_none,
        "initial": before, "final": weights(model),
    }


def ddp_sparse_ignored(rank):
    """A sparse_grad layer whose parameters DDP is told to ignore is not refused: the
    caller all-reduces its sparse gradient (gloo reduces sparse tensors)."""
    model = make_model()
    model[0].sparse_grad = True
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, ["0.weight", "0.bias"]
    )
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    sparse_seen = []
    for step in range(STEPS):
        x, t = rank_batch(rank, step)
        opt.zero_grad(set_to_none=True)
        loss_of(ddp, x, t).backward()
        for p in model[0].parameters():
            sparse_seen.append(p.grad.is_sparse)
            reduced = p.grad.coalesce()
            dist.all_reduce(reduced)
            p.grad = reduced.coalesce() / WORLD
        opt.step()
    return {"sparse_seen": sparse_seen, "final": weights(model)}


def _fsdp_train(rank, model, *, shard_layers=True, twin=None):
    """FSDP2 training steps; per step the full (unsharded) gradients of the meProp layers
    and the local gradients of a plain copy (of ``twin``, when given: a model of the same
    weights) on this rank's data."""
    from torch.distributed.fsdp import fully_shard

    local_model = copy.deepcopy(twin if twin is not None else model)
    if shard_layers:
        for name in MEPROP:
            fully_shard(model.get_submodule(name))
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = []
    for step in range(STEPS):
        full = {n: p.full_tensor() for n, p in model.named_parameters()}
        local_model.load_state_dict(full)
        x, t = rank_batch(rank, step)
        local = local_grads(local_model, x, t)
        opt.zero_grad(set_to_none=True)
        loss_of(model, x, t).backward()
        reduced = {name: model.get_submodule(name).weight.grad.full_tensor() for name in MEPROP}
        steps.append({"local": local, "reduced": reduced})
        opt.step()
    final = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    return {"steps": steps, "final": final, "initial": weights(make_model())}


def fsdp2_topk(rank):
    return _fsdp_train(rank, make_model())


def fsdp2_topk_root_only(rank):
    return _fsdp_train(rank, make_model(), shard_layers=False)


def fsdp2_k_equals_out(rank):
    """k = out: FSDP2's gradients are those of the nn.Linear twin."""
    return _fsdp_train(rank, make_model(k1=32, k2=16), twin=make_model(dense=True))


def fsdp2_sparse(rank):
    from torch.distributed.fsdp import fully_shard

    result = {}
    for shard_layers in (True, False):
        model = make_model(sparse_grad=True)
        if shard_layers:
            for name in MEPROP:
                fully_shard(model.get_submodule(name))
        fully_shard(model)
        x, t = rank_batch(rank, 0)
        try:
            loss_of(model, x, t).backward()
            result[shard_layers] = None
        except RuntimeError as e:
            result[shard_layers] = str(e)
    return result


SCENARIOS = {
    "ddp_dense": ddp_dense,
    "ddp_sparse": ddp_sparse,
    "ddp_sparse_ignored": ddp_sparse_ignored,
    "fsdp2_topk": fsdp2_topk,
    "fsdp2_topk_root_only": fsdp2_topk_root_only,
    "fsdp2_k_equals_out": fsdp2_k_equals_out,
    "fsdp2_sparse": fsdp2_sparse,
}


def worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=PG_TIMEOUT_S))
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=WORLD, timeout=timedelta(seconds=PG_TIMEOUT_S),
    )
    results = {}
    try:
        for name, scenario in SCENARIOS.items():
            try:
                results[name] = {"ok": scenario(rank)}
            except Exception:  # recorded, and shown by the test that reads it
                results[name] = {"failed": traceback.format_exc()}
            dist.barrier()  # a scenario that failed on one rank only cannot skew the next
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every scenario's records, ``runs[name]`` = ``[rank 0's, rank 1's]``."""
    out = tmp_path_factory.mktemp("distributed")
    start = time.monotonic()
    # The rendezvous store is served from here, on a port the system picks and this
    # process holds throughout: no port is released and picked again in between, where
    # another test's processes (the README's torchrun example) could take it.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=PG_TIMEOUT_S))
    ctx = mp.spawn(worker, args=(store.port, str(out)), nprocs=WORLD, join=False)
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() - start > DEADLINE_S:
                pytest.fail(f"the {WORLD} workers did not finish within {DEADLINE_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {name: [ranks[r][name] for r in range(WORLD)] for name in SCENARIOS}


def records(runs, name):
    per_rank = runs[name]
    for rank, rec in enumerate(per_rank):
        assert "ok" in rec, f"{name} failed on rank {rank}:\n{rec.get('failed')}"
    return [rec["ok"] for rec in per_rank]


def rows(grad) -> set:
    return set((grad != 0).any(1).nonzero().flatten().tolist())


def assert_ranks_identical(final0: dict, final1: dict, initial: dict):
    assert final0.keys() == final1.keys()
    for n in final0:
        assert torch.equal(final0[n], final1[n]), f"{n} differs between ranks"
    assert any(not torch.equal(final0[n], initial[n]) for n in final0), "nothing trained"


def check_reduced_is_mean_of_local(recs, ks=(K1, K2)):
    """Per step and meProp layer: the reduced gradient is the same on every rank, equals
    the mean of the ranks' local meProp gradients, and its non-zero rows are the union
    of the ranks' kept units (at most WORLD x k). Returns the union sizes seen."""
    unions = {name: [] for name in MEPROP}
    for step in range(STEPS):
        for name, k in zip(MEPROP, ks):
            locals_ = [rec["steps"][step]["local"][name] for rec in recs]
            reduced = [rec["steps"][step]["reduced"][name] for rec in recs]
            assert torch.equal(reduced[0], reduced[1]), f"step {step} {name}: ranks differ"
            for g in locals_:
                assert len(rows(g)) == min(k, g.shape[0]), f"step {step} {name}: a rank kept {len(rows(g))} rows"
            torch.testing.assert_close(reduced[0], sum(locals_) / WORLD, rtol=1e-12, atol=1e-15)
            union = set().union(*(rows(g) for g in locals_))
            assert rows(reduced[0]) == union, f"step {step} {name}"
            assert len(union) <= WORLD * k
            unions[name].append(len(union))
    return unions


# --- DistributedDataParallel ------------------------------------------------------------


def test_ddp_dense_gradient_is_the_mean_of_each_ranks_own_topk(runs):
    recs = records(runs, "ddp_dense")
    unions = check_reduced_is_mean_of_local(recs)
    # The ranks' data differ, so their kept units differ: more than k rows, up to 2k.
    for name, k in zip(MEPROP, (K1, K2)):
        assert max(unions[name]) > k, f"{name}: unions {unions[name]} never exceed k={k}"


def test_ddp_dense_ranks_identical_after_steps(runs):
    recs = records(runs, "ddp_dense")
    assert_ranks_identical(recs[0]["final"], recs[1]["final"], recs[0]["initial"])


def test_ddp_sparse_grad_refused_with_the_alternative_then_dense_trains(runs):
    recs = records(runs, "ddp_sparse")
    for rec in recs:
        err = rec["error"]
        assert err is not None, "sparse_grad=True under DDP was not refused"
        assert "sparse_grad=True does not work under DistributedDataParallel" in err
        assert "Use sparse_grad=False" in err and "world_size x k" in err
        assert rec["unchanged"] and rec["grads_none"], "the refused call changed something"
    assert_ranks_identical(recs[0]["final"], recs[1]["final"], recs[0]["initial"])


def test_ddp_sparse_grad_allowed_on_parameters_ddp_ignores(runs):
    recs = records(runs, "ddp_sparse_ignored")
    for rec in recs:
        assert rec["sparse_seen"] and all(rec["sparse_seen"])
    for n in recs[0]["final"]:
        assert torch.equal(recs[0]["final"][n], recs[1]["final"][n]), n


# --- FSDP2 (fully_shard) ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["fsdp2_topk", "fsdp2_topk_root_only"], ids=["layers-and-root", "root-only"])
def test_fsdp2_gradient_is_the_mean_of_each_ranks_own_topk(runs, name):
    recs = records(runs, name)
    unions = check_reduced_is_mean_of_local(recs)
    for layer, k in zip(MEPROP, (K1, K2)):
        assert max(unions[layer]) > k
    assert_ranks_identical(recs[0]["final"], recs[1]["final"], recs[0]["initial"])


def test_fsdp2_k_equals_out_gives_the_dense_gradient(runs):
    recs = records(runs, "fsdp2_k_equals_out")
    # The local twin is nn.Linear: the reduced gradient is the dense one.
    check_reduced_is_mean_of_local(recs, ks=(32, 16))
    assert_ranks_identical(recs[0]["final"], recs[1]["final"], recs[0]["initial"])


def test_fsdp2_sparse_grad_refused(runs):
    for rec in records(runs, "fsdp2_sparse"):
        for shard_layers, err in rec.items():
            assert err is not None, f"shard_layers={shard_layers}: not refused"
            assert "sparse_grad=True does not work under FSDP2 (fully_shard)" in err
            assert "use sparse_grad=False" in err
