"""A short meProp demo (10-15 s on 2 CPU cores): the same MLP trained densely and with meProp.

    python -m meprop_triton.demo [--k 0.1] [--epochs 3] [--device cpu]

Synthetic data (Gaussian clusters), so it runs offline on any machine. The MLP's hidden
layers are converted with ``convert``; its output layer stays dense, as in the paper.
Prints the test accuracy and the backward time of each run. Both runs train with fused
Adam; on a CPU the demo first flushes denormals and keeps freed memory for reuse, as the
README advises for CPU training (``meprop_triton.flush_denormals``,
``keep_freed_memory``). The two runs take turns, so a machine that slows down for a
while does not weigh on one of them only.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from . import convert
from .harness import _make_optimizer, _sync, check_device_arg
from .utils import flush_denormals, keep_freed_memory


def make_data(n_train: int, n_test: int, dim: int, classes: int, seed: int):
    """Noisy Gaussian clusters, one per class: ``((x_train, y_train), (x_test, y_test))``."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=gen) * 0.2
    labels = torch.randint(0, classes, (n_train + n_test,), generator=gen)
    x = centers[labels] + torch.randn(n_train + n_test, dim, generator=gen)
    return (x[:n_train], labels[:n_train]), (x[n_train:], labels[n_train:])


def make_model(dim: int, hidden: int, classes: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, classes),
    )


def train(models, data, *, epochs: int, batch: int, device, seed: int):
    """Train each model on the same batches, taking turns batch by batch:
    ``[(test accuracy, backward seconds, training seconds)]``, one per model."""
    (xtr, ytr), (xte, yte) = data
    opts = [_make_optimizer("adam", m.to(device).parameters(), 1e-3) for m in models]
    gen = torch.Generator().manual_seed(seed)
    backward_s, total_s = [0.0] * len(models), [0.0] * len(models)
    for _ in range(epochs):
        for m in models:
            m.train()
        for idx in torch.randperm(len(xtr), generator=gen).split(batch):
            x, y = xtr[idx].to(device), ytr[idx].to(device)
            for i, (model, opt) in enumerate(zip(models, opts)):
                _sync(device)
                t0 = time.perf_counter()
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                _sync(device)
                t1 = time.perf_counter()
                loss.backward()
                _sync(device)
                t2 = time.perf_counter()
                opt.step()
                _sync(device)
                backward_s[i] += t2 - t1
                total_s[i] += time.perf_counter() - t0
    results = []
    for model, bwd, total in zip(models, backward_s, total_s):
        model.eval()
        with torch.no_grad():
            acc = (model(xte.to(device)).argmax(1).cpu() == yte).float().mean().item()
        results.append((acc, bwd, total))
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m meprop_triton.demo", description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--k", type=float, default=0.1, help="units kept: a fraction in (0, 1] or a count >= 1 (default 0.1)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    # Checked here, before the dense run trains: a bad value would surface only after it.
    if not (math.isfinite(args.k) and (0 < args.k <= 1 or (args.k >= 1 and args.k == int(args.k)))):
        p.error(f"--k must be a fraction in (0, 1] or a whole count >= 1; got {args.k}")
    for name in ("epochs", "hidden", "batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1; got {getattr(args, name)}")
    device = check_device_arg(p, args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}, but CUDA is not available here")
    k = int(args.k) if args.k >= 1 else args.k
    dim, classes = 256, 20
    data = make_data(12000, 4000, dim, classes, args.seed)
    print(f"MLP {dim}-{args.hidden}-{args.hidden}-{classes}, {args.epochs} epochs, batch {args.batch}, device {device}")

    if device.type == "cpu":
        keep_freed_memory()
        flush_denormals()

    names = ["dense", f"meProp k={k}"]
    models = [make_model(dim, args.hidden, classes, args.seed) for _ in names]
    convert(models[1], k=k, exclude=["4"])  # the output layer stays dense
    results = train(models, data, epochs=args.epochs, batch=args.batch, device=device, seed=args.seed)
    for name, (acc, bwd, _) in zip(names, results):
        print(f"  {name}: test accuracy {acc * 100:.2f}%, backward {bwd:.2f} s")

    base_bwd, base_total = results[0][1], results[0][2]
    print()
    print("| method | backward time (s) | speedup | training time (s) | speedup | test accuracy (%) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (acc, bwd, total) in zip(names, results):
        print(f"| {name} | {bwd:.2f} | {base_bwd / bwd:.2f}x | {total:.2f} | {base_total / total:.2f}x | {acc * 100:.2f} |")


if __name__ == "__main__":
    main()
