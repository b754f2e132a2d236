"""One training step of small transformers' BERT and GPT-2, converted vs dense.

The models are built from configs (random weights, nothing downloaded) and converted as
a user converts them (``convert(model, k=0.1)``; BERT's classifier excluded, GPT-2's tied
``lm_head`` left dense by ``convert`` itself). Both take fused Adam, and the dense twin,
from the same weights, is timed interleaved in the same run (``speedup_vs_dense``). The
attention, embeddings, layer norms and loss are the same on both sides, so the step
shows what meProp's backward is worth in a whole model, not in one layer. Beside the
step, each case records its forward and its backward alone (``meprop_forward_ms`` and
``meprop_backward_ms``, ``dense_...``; medians of interleaved calls after the timed
rounds): meProp changes the backward, and the forward shows what it costs there.

* CPU: BERT (4 layers, hidden 256, 4 heads, FFN 1024) and GPT-2 (4 layers, n_embd 256,
  4 heads), a batch of 8 sequences of 128 tokens, vocabulary 8,000. Target: the meProp
  step at least as fast as the dense one (a meProp layer must never make training
  slower).

These need the optional extra ``pip install -e '.[zoo]'`` (transformers); without it each
case is skipped with the reason.
"""

from __future__ import annotations

import copy
import os
import statistics
import time

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from meprop_triton import convert  # noqa: E402
from meprop_triton._validation import resolve_k  # noqa: E402

from .hardware import device_name  # noqa: E402
from .targets import Target, check_targets  # noqa: E402
from .timing import measure  # noqa: E402
from .workloads import rotating  # noqa: E402

try:
    import transformers
except Exception as e:  # noqa: BLE001 - any failure to import is a reason to skip
    transformers = None
    SKIP = f"transformers is not usable here (the optional extra: pip install -e '.[zoo]'): {type(e).__name__}: {e}"
else:
    SKIP = ""

# name -> (device, batch, tokens, hidden, layers, heads, vocabulary, k, timing budget in s)
MODELS = {
    "bert": ("cpu", 8, 128, 256, 4, 4, 8000, 0.1, 3.0),
    "gpt2": ("cpu", 8, 128, 256, 4, 4, 8000, 0.1, 3.0),
}
TARGET = Target("speedup_vs_dense", least=1.0)
N_SETS = 3
SIDE_ROUNDS = 5  # interleaved forward / backward timings after the timed rounds


def build(name):
    """(dense model, meProp model, the function of (model, batch) that gives the loss,
    the batches)."""
    device, batch, tokens, hidden, layers, heads, vocab, k, _ = MODELS[name]
    torch.manual_seed(0)
    if name == "bert":
        config = transformers.BertConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=4 * hidden, max_position_embeddings=tokens, num_labels=3,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        dense = transformers.BertForSequenceClassification(config)
        exclude = ["classifier"]

        def loss_of(model, xy):
            return model(input_ids=xy[0], labels=xy[1]).loss
    else:
        config = transformers.GPT2Config(
            vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=tokens,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        dense = transformers.GPT2LMHeadModel(config)
        exclude = None  # the tied lm_head stays dense on its own

        def loss_of(model, xy):
            return model(input_ids=xy[0], labels=xy[0]).loss
    dense = dense.to(device).train()
    meprop = convert(copy.deepcopy(dense), k=k, exclude=exclude)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, vocab, (batch, tokens), generator=gen).to(device),
                torch.randint(0, 3, (batch,), generator=gen).to(device)) for _ in range(N_SETS)]
    return dense, meprop, loss_of, batches


def step_call(model, loss_of, batches):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)

    def make(xy):
        def step():
            opt.zero_grad()
            loss_of(model, xy).backward()
            opt.step()
        return step

    return rotating([make(xy) for xy in batches])


def forward_backward_ms(models, loss_of, batches):
    """Median ms of the forward alone and of the backward alone, per model, interleaved."""
    times = {name: ([], []) for name in models}
    for r in range(SIDE_ROUNDS):
        xy = batches[r % len(batches)]
        for name, model in models.items():
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss = loss_of(model, xy)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            times[name][0].append(t1 - t0)
            times[name][1].append(t2 - t1)
    out = {}
    for name, (fwd, bwd) in times.items():
        out[f"{name}_forward_ms"] = round(statistics.median(fwd) * 1e3, 3)
        out[f"{name}_backward_ms"] = round(statistics.median(bwd) * 1e3, 3)
    return out


@pytest.mark.skipif(transformers is None, reason=SKIP)
@pytest.mark.parametrize("name", list(MODELS), ids=[f"cpu-{n}" for n in MODELS])
def test_zoo_train_step(benchmark, request, name):
    device, batch, tokens, hidden, layers, heads, vocab, k, budget = MODELS[name]
    dense, meprop, loss_of, batches = build(name)
    converted = sum(1 for m in meprop.modules() if type(m).__name__.startswith("MeProp"))
    ffn = 4 * hidden
    benchmark.group = f"train-step-{device}-{name}-{layers}x{hidden}-b{batch}x{tokens}"
    benchmark.extra_info.update(
        backend="torch", mode="unified-topk", grad="dense", shape=[batch * tokens, hidden, ffn],
        shape_name=f"{name}-{layers}x{hidden}", model=name, layers_converted=converted,
        k_requested=k, k=resolve_k(k, hidden), k_ffn=resolve_k(k, ffn), dtype="fp32",
        device=device_name(device), device_type=device, threads=torch.get_num_threads(),
        transformers=transformers.__version__, optimizer="Adam (fused)",
        baseline=f"the dense {name} with Adam (fused), from the same weights",
    )
    fns = {"dense": step_call(dense, loss_of, batches), "meprop": step_call(meprop, loss_of, batches)}
    medians = measure(benchmark, fns, candidate="meprop", device=device, budget_s=budget, min_rounds=10)
    if medians is None:
        return
    speedup = medians.paired["dense"]
    benchmark.extra_info.update(
        speedup_vs_dense=round(speedup, 3),
        ratio_of_medians_vs_dense=round(medians["dense"] / medians["meprop"], 3),
        roofline_note="not modelled for a whole training step",
        **forward_backward_ms({"meprop": meprop, "dense": dense}, loss_of, batches),
    )
    check_targets(
        benchmark, request.config, TARGET, {"speedup_vs_dense": speedup},
        context=f"meProp step {medians['meprop'] * 1e3:.1f} ms vs dense {medians['dense'] * 1e3:.1f} ms",
    )
