"""The experiments' shared harness: one training run, runs taking turns, timing, reports.

``meprop-mnist`` (:mod:`meprop_triton.mnist`) and ``meprop-pos`` (:mod:`meprop_triton.pos`)
are thin command-line scripts over this module: each adds its model and data as a
subclass of :class:`Training` (what a minibatch's loss is, how a split is evaluated) and
reuses the rest: a run's random state and data order kept apart from the others', so
that ``--compare``'s runs can take turns every :data:`TURN_STEPS` minibatches
(:func:`interleave`) and still train exactly as alone; the timing of every step
(backprop time, the whole ``loss.backward()``, the whole training step); the per-epoch
records, best-dev-epoch selection and the run's record for the JSON; the Markdown table
(:func:`format_table`), the plot (:func:`write_plot`), the device description and the
JSON file (:func:`write_json`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["LinearBackwardTimer", "Training", "TURN_STEPS", "format_table", "interleave",
           "progress_writer", "report_results", "run_alone", "write_json", "write_plot"]


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


# --- argparse types shared by the experiment CLIs


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def _progress_bar(total: int, desc: str, progress: bool | None):
    """A tqdm bar on stderr (shown where stderr is a terminal, or as ``progress`` says)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False,
                disable=None if progress is None else not progress,
                file=sys.stderr, mininterval=0.5)


class Training:
    """One training run, a few minibatches at a time; a subclass adds the model and data.

    Each run owns its model, optimizer, data order and its own state of torch's random
    generator (initial weights, dropout masks), which is swapped in whenever it trains
    or evaluates. So runs can take turns every few minibatches (``--compare`` does, so
    that a slow spell of a shared machine lands on both) and still train exactly as
    they would alone, one after the other.

    A subclass sets, in its ``__init__`` before calling :meth:`setup`: ``name``,
    ``n_train`` (training examples), ``batch_size``, ``n_epochs``; and defines
    :meth:`build` (the model, optimizer and backprop timer, made after the seed is set),
    :meth:`loss` (of a minibatch, given the tensor of its example indices) and
    :meth:`accuracy` (of a split). Optional hooks: :meth:`backward`,
    :meth:`backprop_seconds`, :meth:`after_step`, :meth:`record`, :meth:`close`.
    """

    name: str
    n_train: int
    batch_size: int
    n_epochs: int
    index_device: torch.device | None = None  # where the minibatch indices go

    def setup(self, args, k, device: torch.device, *, label: str = "",
              progress: bool | None = None) -> None:
        self.args, self.k, self.device = args, k, device
        self.label = label
        self.progress = progress
        torch.manual_seed(args.random_seed)  # same initial weights and dropout masks for every run
        if device.type == "cuda":
            torch.cuda.manual_seed_all(args.random_seed)
        self.model, self.opt, self.timer = self.build()
        self.order = torch.Generator().manual_seed(args.random_seed)  # same data order for every run
        self.rng = _rng_state(device)
        self.epochs: list[dict] = []
        self.best: dict | None = None
        self.seconds = 0.0
        self._batches = None

    # --- what a subclass defines
    def build(self):
        """``(model, optimizer, timer)``; ``timer.seconds`` is the backprop time so far."""
        raise NotImplementedError

    def loss(self, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def accuracy(self, split: str) -> float:
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def backprop_seconds(self) -> float | None:
        """Backprop time so far; None where it cannot be measured apart."""
        return self.timer.seconds

    def after_step(self) -> None:
        """Called after each optimizer step (meSimp's checks)."""

    def record(self, run: dict, final: bool = True) -> dict:
        """The run's record, completed by the subclass (``final``: at the run's end, else
        for an unfinished results file after an epoch)."""
        return run

    def close(self) -> None:
        """Remove the timing hooks."""
        self.timer.remove()

    # --- the loop
    @property
    def n_batches(self) -> int:
        return math.ceil(self.n_train / self.batch_size)

    def start_epoch(self) -> None:
        """Draw the epoch's data order; :meth:`train_steps` then trains through it."""
        perm = torch.randperm(self.n_train, generator=self.order)
        if self.index_device is not None:
            perm = perm.to(self.index_device)
        self._batches = iter(perm.split(self.batch_size))
        self._epoch = dict(backprop_before=self.backprop_seconds(), backward_s=0.0, loss_sum=0.0,
                           steps=0, train_s=0.0, check_eval_s=0.0, prune_s=0.0)

    def train_steps(self, n: int | None = None, bar=None) -> bool:
        """Train up to ``n`` minibatches of the epoch (all that are left when None);
        True once the epoch's minibatches are done."""
        device, ep = self.device, self._epoch
        t_start = time.perf_counter()
        excluded = ep["check_eval_s"]
        _set_rng_state(self.rng, device)
        try:
            self.model.train()
            done = 0
            while n is None or done < n:
                idx = next(self._batches, None)
                if idx is None:
                    return True
                loss = self.loss(idx)
                self.opt.zero_grad(set_to_none=True)
                _sync(device)
                t0 = time.perf_counter()
                self.backward(loss)
                _sync(device)
                ep["backward_s"] += time.perf_counter() - t0
                self.opt.step()
                ep["loss_sum"] += loss.item()
                ep["steps"] += 1
                done += 1
                if bar is not None:
                    bar.update(1)
                self.after_step()
            return False
        finally:
            self.rng = _rng_state(device)
            # training time: evaluations inside the epoch (meSimp's checks) are left out
            ep["train_s"] += time.perf_counter() - t_start - (ep["check_eval_s"] - excluded)

    def epoch_suffix(self, record: dict) -> str:
        """More for an epoch's log line (meSimp's dimensions)."""
        return ""

    def end_epoch(self) -> dict:
        """Evaluate on dev and test after a finished epoch; the epoch's record."""
        device, ep = self.device, self._epoch
        t0 = time.perf_counter()
        _set_rng_state(self.rng, device)
        try:
            dev_acc = self.accuracy("dev")
            test_acc = self.accuracy("test")
        finally:
            self.rng = _rng_state(device)
        epoch = len(self.epochs)
        record = {
            "epoch": epoch + 1,
            "loss": ep["loss_sum"] / max(ep["steps"], 1),
            "dev_acc": dev_acc,
            "test_acc": test_acc,
            "backprop_time_s": _minus(self.backprop_seconds(), ep["backprop_before"]),
            "backward_time_s": ep["backward_s"],
            "train_s": ep["train_s"],
            "seconds": ep["train_s"] + ep["check_eval_s"] + time.perf_counter() - t0,
        }
        self.epoch_record(record)
        self.seconds += record["seconds"]
        improved = self.best is None or dev_acc > self.best["dev_acc"]
        if improved:
            self.best = record
        self.epochs.append(record)
        self._batches = None
        print(
            f"  {self.label}epoch {epoch + 1:>2}/{self.n_epochs}: loss {record['loss']:.4f}, "
            f"dev {dev_acc * 100:.2f}%, test {test_acc * 100:.2f}%{' *' if improved else '  '} "
            f"backprop {_seconds(record['backprop_time_s'])} s, backward {ep['backward_s']:.2f} s, "
            f"epoch {record['seconds']:.1f} s" + self.epoch_suffix(record),
            flush=True,
        )
        return record

    def epoch_record(self, record: dict) -> None:
        """Add to an epoch's record (meSimp's dimensions)."""

    def run_epoch(self) -> dict:
        """Train one epoch, then evaluate on dev and test; the epoch's record."""
        with _progress_bar(self.n_batches, f"  {self.label}epoch {len(self.epochs) + 1}/{self.n_epochs}",
                           self.progress) as bar:
            self.start_epoch()
            self.train_steps(None, bar)
        return self.end_epoch()

    def snapshot(self) -> dict:
        """The run's record over the epochs finished so far (at least one), as
        :meth:`finish` gives it but without the parts only the end gives (meSimp's final
        model): what an unfinished results file holds."""
        return self.record(self._run(), final=False)

    def finish(self) -> dict:
        """Remove the timing hooks; the run's record for the JSON."""
        self.close()
        run = self.record(self._run())
        print(
            f"{self.name}: best dev {run['dev_acc'] * 100:.2f}% at epoch {run['best_epoch']}: test "
            f"{run['test_acc'] * 100:.2f}%; backprop {_seconds(run['backprop_time_s'])} s, backward "
            f"{run['backward_time_s']:.2f} s, training {run['training_time_s']:.2f} s, "
            f"epochs {self.seconds:.1f} s",
            flush=True,
        )
        return run

    def _run(self) -> dict:
        best, epochs = self.best, self.epochs
        return {
            "method": self.name,
            "k": self.k,
            "dev_acc": best["dev_acc"],
            "test_acc": best["test_acc"],
            "best_epoch": best["epoch"],
            "backprop_time_s": _total(e["backprop_time_s"] for e in epochs),
            "backward_time_s": sum(e["backward_time_s"] for e in epochs),
            # forward + backward + optimizer over every training step (evaluation excluded)
            "training_time_s": sum(e["train_s"] for e in epochs),
            "epochs": list(epochs),
            "seconds": self.seconds,
        }


def _minus(a, b):
    return None if a is None else a - b


def _total(values):
    """The sum; None if any value is None (backprop time where it is not measured)."""
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


def run_alone(training: Training, on_epoch=None) -> dict:
    """Train one run for all its epochs; its record. ``on_epoch``: called after each
    epoch but the last with ``[training.snapshot()]``."""
    print(f"{training.name}:", flush=True)
    try:
        for epoch in range(training.n_epochs):
            training.run_epoch()
            if on_epoch is not None and epoch + 1 < training.n_epochs:
                on_epoch([training.snapshot()])
    except BaseException:
        training.close()
        raise
    return training.finish()


def interleave(trainings: list[Training], *, progress: bool | None = None,
               turn_steps: int = TURN_STEPS, on_epoch=None) -> list[dict]:
    """Train the runs taking turns every ``turn_steps`` minibatches; their records, in
    order. Each epoch ends with every run's evaluation, in order, then (but after the
    last) ``on_epoch`` with the runs' snapshots, when given."""
    width = max(len(t.name) for t in trainings)
    for t in trainings:
        t.label = f"{t.name:<{width}}  "
    n_epochs = trainings[0].n_epochs
    print(f"runs take turns every {turn_steps} minibatches: "
          + ", ".join(t.name for t in trainings), flush=True)
    try:
        for epoch in range(n_epochs):
            total = sum(t.n_batches for t in trainings)
            with _progress_bar(total, f"  epoch {epoch + 1}/{n_epochs}", progress) as bar:
                for t in trainings:
                    t.start_epoch()
                running = list(trainings)
                while running:
                    running = [t for t in running if not t.train_steps(turn_steps, bar)]
            for t in trainings:
                t.end_epoch()
            if on_epoch is not None and epoch + 1 < n_epochs:
                on_epoch([t.snapshot() for t in trainings])
    except BaseException:
        for t in trainings:
            t.close()
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
            speedup = ("-" if run["backprop_time_s"] is None
                       else f"{base['backprop_time_s'] / run['backprop_time_s']:.2f}x")
            train_speedup = f"{base['training_time_s'] / run['training_time_s']:.2f}x"
            d = (run["test_acc"] - base["test_acc"]) * 100
            delta = "" if run is base else f" ({d:+.2f})"
        lines.append(
            f"| {run['method']} | {_seconds(run['backprop_time_s'])} | {speedup} | "
            f"{run['backward_time_s']:.2f} | {run['training_time_s']:.2f} | {train_speedup} | "
            f"{run['dev_acc'] * 100:.2f} | {run['test_acc'] * 100:.2f}{delta} |"
            + (_simplify_columns(run) if simp else "")
        )
    return "\n".join(lines)


def _seconds(value) -> str:
    """A time for the table; ``-`` where it was not measured (None)."""
    return "-" if value is None else f"{value:.2f}"


def _simplify_columns(run: dict) -> str:
    if not run.get("simplify"):
        return " - | - | - | - |"
    if "final_dims" not in run:  # an unfinished run: its sizes so far, no inference timed yet
        return f" {', '.join(map(str, run['epochs'][-1]['dims']))} | - | - | - |"
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
        ax_time.bar(xs - w, [r["backprop_time_s"] or 0.0 for r in runs], w,
                    label="backprop (the linear transformations)"),
        ax_time.bar(xs, [r["backward_time_s"] for r in runs], w, label="whole backward", alpha=0.6),
        ax_time.bar(xs + w, [r["training_time_s"] for r in runs], w,
                    label="training (forward + backward + optimizer)", alpha=0.45),
    ]
    fmt = "%.1f" if max(r["training_time_s"] for r in runs) >= 10 else "%.2f"
    for b in bars[1:]:
        ax_time.bar_label(b, fmt=fmt, fontsize=7)
    # a run whose backprop time is not measured apart (None) is labelled so, not drawn as 0
    ax_time.bar_label(bars[0], labels=["n/a" if r["backprop_time_s"] is None else fmt % r["backprop_time_s"]
                                       for r in runs], fontsize=7)
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


def check_device_arg(p: argparse.ArgumentParser, text: str, choices: str = "cpu, cuda or cuda:N") -> torch.device:
    """``--device``'s value as a device these runs take (CPU or CUDA), else the parser's
    error naming it."""
    try:
        device = torch.device(text)
    except RuntimeError:
        p.error(f"--device must be {choices}; got {text!r}")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device must be {choices}; got {text!r} (these runs take cpu or cuda)")
    return device


def check_common_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checks the experiment CLIs share, made before any work (a bad path would
    otherwise surface only when the results are written, after training): ``--lr``
    positive and finite, ``--device`` one torch knows and these runs take, ``--json``
    and ``--plot`` writable files (a plot's format from its suffix; none: PNG, added to
    the name as matplotlib adds it)."""
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be a positive finite number; got {args.lr}")
    if args.device != "auto":
        check_device_arg(p, args.device, "auto, cpu, cuda or cuda:N")
    for option, attr in (("--json", "json_path"), ("--plot", "plot_path")):
        path = getattr(args, attr, None)
        if not path:
            continue
        target = Path(path)
        if option == "--plot":
            if not target.suffix:
                target = target.with_name(target.name + ".png")
                setattr(args, attr, str(target))
            else:
                from matplotlib.backend_bases import FigureCanvasBase

                formats = FigureCanvasBase.get_supported_filetypes()
                if target.suffix[1:].lower() not in formats:
                    p.error(f"--plot {path}: matplotlib cannot write '{target.suffix}' files; "
                            f"use one of {', '.join('.' + f for f in sorted(formats))}")
        if target.is_dir():
            p.error(f"{option} {path} is a folder; give a file name")
        parent = target.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)  # as writing the file would, later
        except OSError as e:
            p.error(f"{option} {path}: cannot make its folder {parent} ({e.strerror or e})")
        if not os.access(parent, os.W_OK | os.X_OK):
            p.error(f"{option} {path}: cannot write there ({parent} is not a writable folder)")


def _resolve_device(text: str, prog: str = "meprop-mnist") -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(text)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{prog}: --device cuda, but CUDA is not available here")
    return device


def _device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    return f"cpu: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def progress_writer(args, config: dict, device: torch.device, t_start: float, done: list | None = None):
    """The ``on_epoch`` of :func:`run_alone` / :func:`interleave` that rewrites the
    ``--json`` file (``args.json_path``) after each epoch, unfinished (``done``: runs
    finished before, listed first); None without ``--json``."""
    if not args.json_path:
        return None
    failed = []

    def save(runs: list[dict]) -> None:
        runs = [*(done or ()), *runs]
        try:
            write_json(args.json_path, runs, config, device, format_table(runs, args.optimizer, device.type),
                       time.perf_counter() - t_start, complete=False)
        except OSError as e:  # training goes on; the file is written again after the next epoch and at the end
            if not failed:
                print(f"warning: could not write the unfinished results to {args.json_path}: {e}",
                      file=sys.stderr, flush=True)
            failed.append(e)

    return save


def report_results(args, runs: list[dict], config: dict | None, device: torch.device, t_start: float) -> None:
    """Print the results table and the wall time since ``t_start``; write the finished
    ``--json`` file (``config`` gets the load average at the end)."""
    table = format_table(runs, args.optimizer, device.type)
    total = time.perf_counter() - t_start
    print()
    print(table)
    print()
    print(f"total wall time {total:.1f} s", flush=True)
    if args.json_path:
        config["loadavg_end"] = _loadavg()
        path = write_json(args.json_path, runs, config, device, table, total)
        print(f"wrote {path}")


def write_json(path, runs: list[dict], config: dict, device: torch.device, table: str,
               total_seconds: float, *, complete: bool = True) -> Path:
    """The results file: ``runs``, ``config``, ``device``, ``table``, ``total_seconds``,
    ``complete`` (False in the file the commands rewrite after each epoch but the last,
    whose runs hold the epochs finished so far).

    A regular file (``path`` itself, or the file a symbolic link ``path`` points to) is
    written to a temporary file beside it, with the old file's permissions, and renamed
    over it, so a run stopped while writing leaves the previous file whole; anything
    else (a device such as ``/dev/stdout``) is written directly."""
    result = {
        "runs": runs,
        "config": config,
        "device": _device_description(device),
        "table": table,
        "total_seconds": total_seconds,
        "complete": complete,
    }
    text = json.dumps(result, indent=2) + "\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    target = path.resolve()
    if target.exists() and not target.is_file():
        path.write_text(text)
        return path
    part = target.with_name(f".{target.name}.{os.getpid()}.part")  # (one per process writing)
    try:
        part.write_text(text)
        if target.exists():
            shutil.copymode(target, part)
        os.replace(part, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(part)
        raise
    return path
