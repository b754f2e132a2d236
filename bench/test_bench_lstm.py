"""An LSTM layer's forward + backward: MePropLSTM (top-k and k = H) against torch's nn.LSTM.

The shape is the POS tagger's (``meprop-pos``): one 500-unit layer over a 190-d input, a
25-word sentence, one sentence per step (the paper's minibatch), and 32 sentences as a
batch. Each call is a forward and ``backward()`` of the layer with its input requiring a
gradient (as the tagger's embeddings do), fp32 on the CPU.

* ``dense``: ``MePropLSTM`` at ``k = H`` (the same code the top-k run uses, with every
  unit kept), timed next to ``nn.LSTM`` sharing its weights. Target (issue 15): within
  1.5x of ``nn.LSTM``'s time (``speedup_vs_nn_lstm >= 0.667``): the dense baseline of
  ``meprop-pos --compare`` is no straw man.
* ``topk``: ``MePropLSTM`` at k = 5 per gate, timed next to both. Target (issue 15):
  faster than ``nn.LSTM`` (``speedup_vs_nn_lstm >= 1.0``).

Both targets apply at both batch sizes. At one sentence a step both are met (the
products are matrix-vector ones, bound by reading the weights). At 32 sentences the top-k
case is about even with ``nn.LSTM`` and the dense one is not met, for a reason outside
this package's code on some CPUs: ``nn.LSTM`` runs oneDNN's fused LSTM, while every
product here goes through ``torch.mm`` / ``addmm`` and so through MKL's sgemm. On the
2-core AMD EPYC development machine (torch 2.13.0+cpu, one thread) MKL's sgemm reaches
about 89 GFLOP/s at 1024^3 and oneDNN's LSTM forward about 159 GFLOP/s; ``nn.LSTM``'s
forward + backward at 25 x 32 x 190 -> 500 took 41.8 ms, and 91.9 ms with oneDNN turned
off (``torch.backends.mkldnn.flags(enabled=False)``), against 83.8 ms for the dense
``MePropLSTM`` and 36.3 ms at k = 5. Each case therefore also times ``nn.LSTM`` with
oneDNN turned off (``nn_lstm_no_onednn_median_s`` and ``speedup_vs_nn_lstm_no_onednn`` in
its ``extra_info``): the same products as ``nn.LSTM`` through the same BLAS as here.

Targets are recorded in each case's ``extra_info`` by ``bench/targets.py``; they fail a
run only under ``--assert-targets``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from meprop_triton import MePropLSTM

from .targets import Target, check_targets
from .timing import measure
from .workloads import rotating

STEPS, IN, H, K = 25, 190, 500, 5
BATCHES = [1, 32]
N_SETS = 3
# the same targets at both batch sizes: a meProp layer must not make training slower
TARGETS = {
    (mode, batch): Target("speedup_vs_nn_lstm", least=1 / 1.5 if mode == "dense" else 1.0)
    for mode in ("dense", "topk") for batch in BATCHES
}


def _call(lstm: nn.Module, batch: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    calls = []
    for _ in range(N_SETS):
        x = torch.randn(STEPS, batch, IN, generator=gen).requires_grad_()
        g = torch.randn(STEPS, batch, H, generator=gen)

        def step(x=x, g=g):
            x.grad = None
            lstm.zero_grad(set_to_none=True)
            out, _ = lstm(x)
            out.backward(g)
            return x.grad

        calls.append(step)
    return rotating(calls)


def _without_onednn(call):
    # torch.backends.mkldnn.flags() would also set oneDNN's TF32 flag, which warns on CPUs
    def run():
        before = torch._C._get_mkldnn_enabled()
        torch._C._set_mkldnn_enabled(False)
        try:
            return call()
        finally:
            torch._C._set_mkldnn_enabled(before)
    return run


def _models():
    torch.manual_seed(0)
    plain = nn.LSTM(IN, H)
    return plain, MePropLSTM.from_lstm(plain, k=H), MePropLSTM.from_lstm(plain, k=K)


@pytest.mark.parametrize("batch", BATCHES, ids=[f"batch{b}" for b in BATCHES])
@pytest.mark.parametrize("mode", ["dense", "topk"])
def test_lstm_forward_backward(benchmark, request, mode, batch):
    plain, dense, topk = _models()
    benchmark.group = f"lstm-cpu-{STEPS}x{batch}x{IN}->{H}"
    benchmark.extra_info.update(
        mode=mode, k=H if mode == "dense" else K, steps=STEPS, batch=batch, input_size=IN, hidden=H,
        dtype="float32", device_type="cpu", threads=torch.get_num_threads(),
        baseline="torch's nn.LSTM with the same weights (forward + backward)",
    )
    fns = {
        "nn_lstm": _call(plain, batch),
        "nn_lstm_no_onednn": _without_onednn(_call(plain, batch)),
        "meprop": _call(dense if mode == "dense" else topk, batch),
    }
    if mode == "topk":
        fns["dense"] = _call(dense, batch)
    target = TARGETS.get((mode, batch))
    medians = measure(benchmark, fns, candidate="meprop", budget_s=1.0, min_rounds=10 if target else 3)
    if medians is None:
        return
    values = {"speedup_vs_nn_lstm": medians.paired["nn_lstm"]}
    benchmark.extra_info.update(
        speedup_vs_nn_lstm=round(values["speedup_vs_nn_lstm"], 3),
        speedup_vs_nn_lstm_no_onednn=round(medians.paired["nn_lstm_no_onednn"], 3),
    )
    if mode == "topk":
        benchmark.extra_info.update(speedup_vs_dense=round(medians.paired["dense"], 3))
    if target is not None:
        check_targets(
            benchmark, request.config, target, values,
            context=f"MePropLSTM {medians['meprop'] * 1e3:.2f} ms vs nn.LSTM {medians['nn_lstm'] * 1e3:.2f} ms",
        )


SPARSE_SHAPES = {"tagger": (190, 500), "wide": (1000, 2000)}
SPARSE_OPTIMIZERS = {
    "adagrad": (lambda ps, sparse: torch.optim.Adagrad(ps, lr=0.01)),
    "adam": (lambda ps, sparse: torch.optim.SparseAdam(ps, lr=1e-3) if sparse else torch.optim.Adam(ps, lr=1e-3, fused=True)),
    "sgd": (lambda ps, sparse: torch.optim.SGD(ps, lr=0.01)),
}


def _train_step(sparse: bool, shape, optimizer: str, steps: int = 21):
    """One training step of a ``MePropLSTM`` at k = 5 on one sequence: forward, backward
    and the optimizer's step (Adam: fused Adam on dense gradients, SparseAdam on sparse)."""
    n_in, hidden = shape
    torch.manual_seed(0)
    lstm = MePropLSTM(n_in, hidden, k=K, sparse_grad=sparse)
    opt = SPARSE_OPTIMIZERS[optimizer](list(lstm.parameters()), sparse)
    gen = torch.Generator().manual_seed(1)
    calls = []
    for _ in range(N_SETS):
        x = torch.randn(steps, 1, n_in, generator=gen).requires_grad_()

        def step(x=x):
            opt.zero_grad(set_to_none=True)
            out, _ = lstm(x)
            out.pow(2).sum().backward()
            opt.step()

        calls.append(step)
    return rotating(calls)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
@pytest.mark.parametrize("optimizer", list(SPARSE_OPTIMIZERS))
@pytest.mark.parametrize("shape", list(SPARSE_SHAPES))
def test_lstm_sparse_grad_train_step(benchmark, shape, optimizer):
    """``sparse_grad=True`` against dense gradients, the whole training step (no target:
    it pays on wide layers only; the README quotes both shapes)."""
    n_in, hidden = SPARSE_SHAPES[shape]
    benchmark.group = f"lstm-sparse-grad-cpu-21x1x{n_in}->{hidden}"
    benchmark.extra_info.update(mode="sparse_grad", k=K, optimizer=optimizer, input_size=n_in, hidden=hidden,
                                steps=21, batch=1, device_type="cpu", threads=torch.get_num_threads())
    fns = {"sparse": _train_step(True, SPARSE_SHAPES[shape], optimizer),
           "dense_grad": _train_step(False, SPARSE_SHAPES[shape], optimizer)}
    medians = measure(benchmark, fns, candidate="sparse", budget_s=1.0, min_rounds=5)
    if medians is not None:
        benchmark.extra_info.update(speedup_vs_dense_grad=round(medians.paired["dense_grad"], 3))
