"""The MNIST command (meprop_triton.mnist) end to end, on tiny synthetic data.

The loader is replaced by a small fake MNIST (or fed small IDX files through
``--data-dir`` with shrunk expected counts), so nothing here needs the network or the
real data set, and each run takes a second or two.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from meprop_triton import MePropLinear, data, harness, mnist

N_TRAIN, N_TEST, N_DEV = 240, 60, 40
# --no-keep-freed-memory: the CLI runs inside the test process, whose malloc is left alone
TINY = ["--d_hidden", "32", "--d_minibatch", "20", "--n_epoch", "1", "--no-keep-freed-memory",
        "--no-flush-denormals"]


def fake_mnist(seed=0) -> data.MNIST:
    """Learnable fake digits: each class lights its own block of pixels, plus noise."""
    rng = np.random.default_rng(seed)

    def make(n):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 * c : 2 * c + 6, 4:24] = 255
        return images, labels

    tr_x, tr_y = make(N_TRAIN)
    te_x, te_y = make(N_TEST)
    return data.MNIST(tr_x, tr_y, te_x, te_y, source="fake")


@pytest.fixture
def fake(monkeypatch):
    calls = []

    def load(data_dir=None, **kw):
        calls.append(data_dir)
        return fake_mnist()

    monkeypatch.setattr(mnist, "load_mnist", load)
    monkeypatch.setattr(mnist, "N_DEV", N_DEV)
    return calls


def run_cli(argv, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    mnist.main([*argv, "--json", str(out_json)])
    printed = capsys.readouterr().out
    return json.loads(out_json.read_text()), printed


RUN_KEYS = {"k", "unified", "selection", "dev_acc", "test_acc", "backprop_time_s",
            "backward_time_s", "epochs", "seconds"}


def test_compare_json_plot(tmp_path, capsys, fake):
    png = tmp_path / "plots" / "r.png"
    result, printed = run_cli([*TINY, "--n_epoch", "2", "--k", "8", "--compare", "--plot", str(png)],
                              tmp_path, capsys)
    assert set(result) >= {"runs", "config", "device"}
    runs = result["runs"]
    assert len(runs) == 2
    dense, meprop = runs
    for run in runs:
        assert RUN_KEYS <= set(run)
        assert 0.0 <= run["dev_acc"] <= 1.0 and 0.0 <= run["test_acc"] <= 1.0
        assert 0.0 < run["backprop_time_s"] <= run["backward_time_s"]
        assert run["seconds"] >= run["backward_time_s"]
        assert [e["epoch"] for e in run["epochs"]] == [1, 2]
        for e in run["epochs"]:
            assert 0.0 <= e["test_acc"] <= 1.0 and e["backprop_time_s"] > 0
        best = run["epochs"][run["best_epoch"] - 1]
        assert best["dev_acc"] == max(e["dev_acc"] for e in run["epochs"])
        assert run["test_acc"] == best["test_acc"]  # test accuracy at the best dev epoch
        assert run["backprop_time_s"] == pytest.approx(sum(e["backprop_time_s"] for e in run["epochs"]))
        assert run["training_time_s"] == pytest.approx(sum(e["train_s"] for e in run["epochs"]))
        # a step's forward, backward and optimizer: more than its backward alone
        assert run["training_time_s"] > run["backward_time_s"] > run["backprop_time_s"] > 0
    assert dense["k"] == 0 and meprop["k"] == 8
    assert meprop["unified"] is True and meprop["selection"] == "topk"
    cfg = result["config"]
    assert cfg["n_epoch"] == 2 and cfg["d_hidden"] == 32 and cfg["k"] == 8 and cfg["compare"] is True
    assert cfg["optimizer"] == "adam" and cfg["lr"] == 1e-3 and cfg["random_seed"] == 12976
    assert cfg["n_dev"] == N_DEV and cfg["n_train"] == N_TRAIN - N_DEV and cfg["n_test"] == N_TEST
    assert isinstance(result["device"], str) and result["device"].startswith("cpu")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the table, like the original README's
    assert "| Method (Adam, CPU) | Backprop time (s) | Speedup | Backward time (s) | Training time (s) | Speedup |" in printed
    assert cfg["fused"] is True
    assert "| MLP 32d (dense) |" in printed and "| meProp top-8 (unified) |" in printed
    assert "1.00x" in printed
    assert fake == [None]


def test_dense_only_with_k0(tmp_path, capsys, fake):
    result, printed = run_cli([*TINY, "--k", "0"], tmp_path, capsys)
    (run,) = result["runs"]
    assert run["k"] == 0
    assert "| MLP 32d (dense) |" in printed


def test_threads_option_sets_torchs_threads(tmp_path, capsys, fake):
    before = torch.get_num_threads()
    try:
        result, _ = run_cli([*TINY, "--k", "0", "--threads", "1"], tmp_path, capsys)
        assert result["config"]["threads"] == result["config"]["torch_threads"] == 1
    finally:
        torch.set_num_threads(before)


def test_options_reach_the_model(tmp_path, capsys, fake, monkeypatch):
    built = []
    real = mnist.build_model
    monkeypatch.setattr(mnist, "build_model", lambda **kw: built.append(real(**kw)) or built[-1])
    result, _ = run_cli([*TINY, "--k", "0.25", "--no-unified", "--selection", "random",
                         "--optimizer", "sgd", "--lr", "0.05", "--sparse-grad", "--n_layer", "4",
                         "--dropout", "0"], tmp_path, capsys)
    (run,) = result["runs"]
    assert run["unified"] is False and run["selection"] == "random" and run["k"] == 0.25
    warm, model = built  # the warm-up's throwaway model, then the run's
    for m in (warm, model):
        assert [type(x) for x in m.modules()] == [type(x) for x in model.modules()]
    hidden = [m for m in model.modules() if isinstance(m, MePropLinear)]
    assert len(hidden) == 3
    assert all(m.k == 0.25 and not m.unified and m.selection == "random" and m.sparse_grad for m in hidden)
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    assert result["config"]["lr"] == 0.05 and result["config"]["optimizer"] == "sgd"


def test_compare_runs_share_initial_weights_and_data_order(tmp_path, capsys, fake):
    # k >= d_hidden: meProp's gradient is the dense one, so both runs must train alike
    result, _ = run_cli([*TINY, "--n_epoch", "2", "--k", "32", "--compare"], tmp_path, capsys)
    dense, meprop = result["runs"]
    for a, b in zip(dense["epochs"], meprop["epochs"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_warm_up_changes_no_timed_run(tmp_path, capsys, fake):
    """The untimed warm-up trains throwaway models: the runs after it are the same
    step for step as without it."""
    with_warm, printed = run_cli([*TINY, "--n_epoch", "1", "--k", "8", "--compare",
                                  "--warmup-steps", "3"], tmp_path, capsys)
    assert "warm-up: 3 untimed steps per method" in printed
    without, printed = run_cli([*TINY, "--n_epoch", "1", "--k", "8", "--compare",
                                "--warmup-steps", "0"], tmp_path, capsys)
    assert "warm-up" not in printed
    assert with_warm["config"]["warmup_steps"] == 3 and without["config"]["warmup_steps"] == 0
    for a, b in zip(with_warm["runs"], without["runs"]):
        assert [e["loss"] for e in a["epochs"]] == [e["loss"] for e in b["epochs"]]
        assert (a["dev_acc"], a["test_acc"]) == (b["dev_acc"], b["test_acc"])


@pytest.mark.parametrize("turn", [1, 5, 1000], ids=lambda t: f"turn{t}")
def test_interleaved_runs_train_as_they_would_alone(turn, capsys, monkeypatch):
    """--compare's runs take turns every few minibatches (here 1, 5, or a whole epoch of
    10), each with its own random state: every epoch's loss and accuracies equal those
    of the same runs done one after the other (dropout on, so the random streams
    matter)."""
    monkeypatch.setattr(mnist, "N_DEV", N_DEV)
    args = mnist.parse_args([*TINY, "--n_epoch", "2", "--k", "8", "--dropout", "0.3"])
    data = mnist.prepare_data(fake_mnist(), torch.device("cpu"))
    alone = [mnist.train_run(args, data, k, torch.device("cpu"), progress=False) for k in (0, 8)]
    turns = mnist.train_interleaved(args, data, (0, 8), torch.device("cpu"), progress=False,
                                    turn_steps=turn)
    assert f"take turns every {turn} minibatches" in capsys.readouterr().out
    for a, b in zip(alone, turns):
        for ea, eb in zip(a["epochs"], b["epochs"]):
            assert (ea["loss"], ea["dev_acc"], ea["test_acc"]) == (eb["loss"], eb["dev_acc"], eb["test_acc"])
    assert alone[0]["epochs"][0]["loss"] != alone[1]["epochs"][1]["loss"]


def test_data_dir_end_to_end(tmp_path, capsys, monkeypatch):
    """--data-dir with gzipped IDX files goes through the real loader."""
    monkeypatch.setattr(data, "MNIST_COUNTS", {"train": N_TRAIN, "test": N_TEST})
    monkeypatch.setattr(mnist, "N_DEV", N_DEV)
    monkeypatch.setattr(data, "_npm_pack", lambda w: pytest.fail("npm tried"))
    fake_set = fake_mnist(1)
    d = tmp_path / "idx"
    d.mkdir()
    for role, name in data.MNIST_FILES.items():
        arr = getattr(fake_set, role)
        head = struct.pack(">I", 0x0800 | arr.ndim) + b"".join(struct.pack(">I", n) for n in arr.shape)
        (d / f"{name}.gz").write_bytes(gzip.compress(head + arr.tobytes()))
    result, printed = run_cli([*TINY, "--data-dir", str(d)], tmp_path, capsys)
    assert result["config"]["data_dir"] == str(d)
    assert f"MNIST from {d}" in printed


def test_data_unavailable_is_a_clean_exit(monkeypatch, capsys):
    def load(data_dir=None, **kw):
        raise data.MNISTUnavailableError("MNIST is not available. Tried:\n  - npm: nope")

    monkeypatch.setattr(mnist, "load_mnist", load)
    with pytest.raises(SystemExit) as e:
        mnist.main(TINY)
    assert "MNIST is not available. Tried:" in str(e.value.code)


@pytest.mark.parametrize(
    "argv,pattern",
    [
        (["--compare", "--k", "0"], "give a --k > 0"),
        (["--sparse-grad"], "Adam does not"),
        (["--k", "-1"], "k must be >= 0"),
        (["--k", "1.5"], r"\(0, 1\]"),
        (["--dropout", "1"], "dropout must lie"),
        (["--optimizer", "rmsprop"], "invalid choice"),
        (["--warmup-steps", "-1"], "must be >= 0"),
        (["--threads", "0"], "must be >= 1"),
        (["--simplify", "--k", "0"], "--simplify prunes by meProp"),
        (["--simplify", "--n_layer", "1"], "n_layer >= 2"),
        (["--prune", "1.5"], r"must lie in \[0, 1\]"),
        (["--train-cycle", "0"], "must be >= 1"),
        (["--prune-checks-per-epoch", "0"], "must be >= 1"),
        # checked before training, not when the results are written after it
        (["--json", "/proc/no/such/r.json"], r"--json /proc/no/such/r.json: cannot make its folder"),
        (["--json", "/"], "is a folder"),
        (["--plot", "/tmp/r.txt"], r"matplotlib cannot write '\.txt' files"),
        (["--lr", "-1"], "--lr must be a positive finite number"),
        (["--lr", "nan"], "--lr must be a positive finite number"),
        (["--device", "bogus"], "--device must be auto, cpu, cuda"),
        (["--device", "meta"], "these runs take cpu or cuda"),
        (["--simplify", "--d_hidden", "64"], "keeps every one of --d_hidden 64"),
    ],
)
def test_bad_arguments(argv, pattern, capsys):
    with pytest.raises(SystemExit) as e:
        mnist.parse_args(argv)
    assert e.value.code == 2
    assert re.search(pattern, capsys.readouterr().err)


def test_defaults_are_the_papers():
    a = mnist.parse_args([])
    assert (a.n_epoch, a.d_hidden, a.n_layer, a.d_minibatch, a.dropout) == (20, 500, 3, 50, 0.1)
    assert (a.k, a.unified, a.random_seed, a.optimizer, a.lr) == (80, True, 12976, "adam", 1e-3)
    assert (a.selection, a.sparse_grad, a.compare, a.data_dir) == ("topk", False, False, None)
    assert a.warmup_steps == 50
    assert mnist.parse_args(["--optimizer", "adagrad"]).lr == 1e-2


def test_build_model_layout_and_init():
    torch.manual_seed(0)
    dense = mnist.build_model(n_layer=3, d_hidden=64, dropout=0.1, k=0)
    torch.manual_seed(0)
    sparse = mnist.build_model(n_layer=3, d_hidden=64, dropout=0.1, k=16)
    assert [type(m) for m in dense] == [nn.Linear, nn.ReLU, nn.Dropout] * 2 + [nn.Linear]
    assert [type(m) for m in sparse] == [MePropLinear, nn.ReLU, nn.Dropout] * 2 + [nn.Linear]
    assert type(sparse.linear2) is nn.Linear  # the output layer stays dense
    assert sparse.linear0.in_features == 784 and sparse.linear2.out_features == 10
    for (n1, p1), (n2, p2) in zip(dense.state_dict().items(), sparse.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    single = mnist.build_model(n_layer=1, d_hidden=64, dropout=0.1, k=16)
    assert [type(m) for m in single] == [nn.Linear]


def test_backward_timer_counts_backward_only():
    model = mnist.build_model(n_layer=3, d_hidden=64, dropout=0.0, k=16)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    timer = mnist.LinearBackwardTimer(linears, torch.device("cpu"))
    x = torch.randn(20, 784)
    with torch.no_grad():
        model(x)
    loss = model(x).sum()
    assert timer.seconds == 0.0  # forward passes are not timed
    loss.backward()
    after_one = timer.seconds
    assert after_one > 0.0
    timer.remove()
    model(x).sum().backward()
    assert timer.seconds == after_one  # removed: no more hooks


def test_module_entry_point_help():
    proc = subprocess.run([sys.executable, "-m", "meprop_triton.mnist", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for flag in ("--n_epoch", "--d_hidden", "--n_layer", "--d_minibatch", "--dropout", "--k",
                 "--unified", "--no-unified", "--random_seed", "--optimizer", "--lr", "--selection",
                 "--sparse-grad", "--device", "--data-dir", "--compare", "--json", "--plot",
                 "--simplify", "--prune", "--train-cycle", "--prune-checks-per-epoch",
                 "--reset-optimizer", "--no-reset-optimizer", "--no-flush-denormals"):
        assert flag in proc.stdout


def test_cli_keeps_freed_memory_by_default(tmp_path, capsys, fake, monkeypatch):
    """By default the command makes malloc keep freed memory (and says so in the JSON);
    --no-keep-freed-memory leaves it alone."""
    calls = []
    monkeypatch.setattr(mnist, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(mnist, "flush_denormals", lambda: True)  # not this test process's
    base = [a for a in TINY if a != "--no-keep-freed-memory"]
    result, _ = run_cli([*base, "--k", "8"], tmp_path, capsys)
    assert calls == [1] and result["config"]["malloc_keeps_freed_memory"] is True
    result, _ = run_cli([*base, "--k", "8", "--no-keep-freed-memory"], tmp_path, capsys)
    assert calls == [1] and result["config"]["malloc_keeps_freed_memory"] is False


def test_cli_flushes_denormals_on_cpu_by_default(tmp_path, capsys, fake, monkeypatch):
    """On a CPU the command flushes denormals (says so in the log and the JSON);
    --no-flush-denormals leaves them, and nothing calls flush_denormals then."""
    calls = []
    monkeypatch.setattr(mnist, "flush_denormals", lambda: calls.append(1) or True)
    base = [a for a in TINY if a != "--no-flush-denormals"]
    result, out = run_cli([*base, "--k", "8", "--device", "cpu"], tmp_path, capsys)
    assert calls == [1] and result["config"]["flush_denormals"] is True
    assert "denormals flushed to zero" in out
    result, out = run_cli([*base, "--k", "8", "--device", "cpu", "--no-flush-denormals"], tmp_path, capsys)
    assert calls == [1] and result["config"]["flush_denormals"] is False
    assert "denormals flushed" not in out


def test_adam_is_fused_unless_asked_not_to():
    from meprop_triton.mnist import _make_optimizer, parse_args

    p = [torch.nn.Parameter(torch.randn(3, 2))]
    assert _make_optimizer("adam", p, 1e-3).param_groups[0]["fused"] is True
    assert not _make_optimizer("adam", p, 1e-3, fused=False).param_groups[0]["fused"]
    assert parse_args([]).fused is True and parse_args(["--no-fused"]).fused is False


# ------------------------------------------------------------------------------ meSimp

# 10 minibatches an epoch; a short schedule: cycles of one epoch (prunes in epochs 1 and 3),
# 4 checks an epoch, a threshold high enough to prune 32 units down within a few checks
SIMP = [*TINY, "--simplify", "--k", "8", "--n_epoch", "3", "--train-cycle", "1",
        "--prune-checks-per-epoch", "4", "--prune", "0.3", "--warmup-steps", "0"]
DIMS_LINE = re.compile(r"Dims: (\d+)\(32\), (\d+)\(32\)")


@pytest.fixture
def quick_inference(monkeypatch):
    monkeypatch.setattr(mnist, "INFERENCE_REPS", 2)


def test_simplify_flags_and_defaults():
    a = mnist.parse_args([])
    assert (a.simplify, a.prune, a.train_cycle, a.prune_checks_per_epoch, a.reset_optimizer) == (
        False, 0.1, 5, 8, True)
    # the authors' meSimp setting (default.json: TrainTop 160, MinibatchSize 100)
    s = mnist.parse_args(["--simplify"])
    assert (s.simplify, s.k, s.d_minibatch, s.n_epoch, s.d_hidden, s.lr) == (True, 160, 100, 20, 500, 1e-3)
    # given explicitly, they stay as given; and the other runs keep the meProp paper's
    s = mnist.parse_args(["--simplify", "--k", "80", "--d_minibatch", "50", "--prune", "0.25",
                          "--train-cycle", "3", "--prune-checks-per-epoch", "2", "--no-reset-optimizer"])
    assert (s.k, s.d_minibatch, s.prune, s.train_cycle, s.prune_checks_per_epoch, s.reset_optimizer) == (
        80, 50, 0.25, 3, 2, False)
    assert mnist.parse_args(["--reset-optimizer"]).reset_optimizer is True
    assert (a.k, a.d_minibatch) == (80, 50)


@pytest.mark.parametrize("epoch,expected", [
    (0, (True, False)), (4, (True, True)), (5, (False, False)), (9, (False, True)),
    (10, (True, False)), (14, (True, True)), (15, (False, False)), (19, (False, True)),
])
def test_check_schedule_is_the_originals(epoch, expected):
    """Mnist.cs: prune when (epoch / TrainCycle) % 2 == 0, new optimizer when
    (epoch + 1) % TrainCycle == 0 (epochs from 0; TrainCycle 5)."""
    assert mnist.check_schedule(epoch, 5) == expected


def test_simplify_prunes_and_shrinks(tmp_path, capsys, fake, quick_inference):
    png = tmp_path / "simp.png"
    result, printed = run_cli([*SIMP, "--plot", str(png)], tmp_path, capsys)
    (run,) = result["runs"]
    assert run["method"] == "meSimp top-8 (unified, prune 0.3)" and run["simplify"] is True
    assert RUN_KEYS <= set(run) and run["training_time_s"] > run["backward_time_s"] > run["backprop_time_s"] > 0
    # pruned: both hidden layers shrank, and never grew back
    final = run["final_dims"]
    assert len(final) == 2 and all(1 <= d < 32 for d in final)
    history = run["dims_history"]
    assert history[0] == [0.0, [32, 32]] and history[-1][1] == final
    for (t0, d0), (t1, d1) in zip(history, history[1:]):
        assert t1 > t0 and all(b <= a for a, b in zip(d0, d1))
    # prunes after each of the 4 checks of epochs 1 and 3 (cycles 0 and 2), none in epoch 2
    assert [t for t, _ in history[1:]] == [0.25, 0.5, 0.75, 1.0, 2.25, 2.5, 2.75, 3.0]
    assert [c["epoch"] for c in run["checks"]] == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0,
                                                    2.25, 2.5, 2.75, 3.0]
    assert [c["pruned"] for c in run["checks"]] == [True] * 4 + [False] * 4 + [True] * 4
    assert all(0.0 <= c["dev_acc"] <= 1.0 for c in run["checks"])
    # the log prints the dimensions after each prune, in the C#'s style
    check_lines = [line for line in printed.splitlines() if re.search(r"\d\.\d{3}: dev ", line)]
    assert len(check_lines) == 12
    printed_dims = [[int(a), int(b)] for line in check_lines for a, b in DIMS_LINE.findall(line)]
    assert printed_dims == [d for _, d in history[1:]]
    assert f"final Dims: {final[0]}(32), {final[1]}(32)" in printed
    assert [e["dims"] for e in run["epochs"]][-1] == final
    assert run["dims_at_best_epoch"] == run["epochs"][run["best_epoch"] - 1]["dims"]
    assert run["final_test_acc"] == run["epochs"][-1]["test_acc"]
    # inference of the final model beside a full-width one, both in JSON and table
    assert run["inference_reps"] == 2 and len(run["inference_times_s"]) == len(run["inference_times_full_s"]) == 2
    assert run["inference_time_s"] > 0 and run["inference_time_full_s"] > 0
    assert run["inference_speedup"] == pytest.approx(run["inference_time_full_s"] / run["inference_time_s"])
    assert "| Hidden sizes | Inference, full width (ms) | Inference, final model (ms) | Speedup |" in printed
    assert f"| {final[0]}, {final[1]} | {run['inference_time_full_s'] * 1e3:.1f} |" in printed
    cfg = result["config"]
    assert (cfg["simplify"], cfg["prune"], cfg["train_cycle"], cfg["prune_checks_per_epoch"],
            cfg["reset_optimizer"]) == (True, 0.3, 1, 4, True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simplified_model_is_physically_smaller(monkeypatch):
    """The run's model itself shrinks: each hidden layer's weight rows, the next layer's
    input columns, and the optimizer holds the new parameters."""
    monkeypatch.setattr(mnist, "N_DEV", N_DEV)
    args = mnist.parse_args(SIMP)
    data = mnist.prepare_data(fake_mnist(), torch.device("cpu"))
    t = mnist.Training(args, data, args.k, torch.device("cpu"), progress=False, simplify=True)
    t.run_epoch()
    d0, d1 = t.dims()
    assert d0 < 32 and d1 < 32
    m = t.model
    assert m.linear0.weight.shape == (d0, 784) and m.linear0.bias.shape == (d0,)
    assert m.linear1.weight.shape == (d1, d0) and m.linear2.weight.shape == (10, d1)
    assert type(m.linear2) is nn.Linear  # the output layer stays dense and whole
    opt_params = {id(p) for g in t.opt.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in m.parameters()}
    assert t.simp.optimizers == [t.opt]
    with torch.no_grad():
        assert m(data["test"][0]).shape == (N_TEST, 10)


def _steps(opt) -> int:
    return max((int(st["step"]) for st in opt.state.values()), default=0)


@pytest.mark.parametrize("reset", [True, False], ids=["reset", "no-reset"])
def test_optimizer_reset_at_cycle_ends(reset, tmp_path, capsys, fake, monkeypatch, quick_inference):
    """Cycles of 2 epochs, 2 checks an epoch: as the C#, a new optimizer after each check
    of epochs 2 and 4 (the cycles' last epochs), i.e. at 1.5, 2.0, 3.5 and 4.0; each one
    steps until the next reset (10 minibatches an epoch)."""
    made = []
    real = mnist._make_optimizer
    monkeypatch.setattr(mnist, "_make_optimizer", lambda *a, **kw: made.append(real(*a, **kw)) or made[-1])
    argv = [*TINY, "--simplify", "--k", "8", "--n_epoch", "4", "--train-cycle", "2",
            "--prune-checks-per-epoch", "2", "--prune", "0.3", "--warmup-steps", "0"]
    result, printed = run_cli([*argv, "--reset-optimizer" if reset else "--no-reset-optimizer"],
                              tmp_path, capsys)
    (run,) = result["runs"]
    # prunes in the first cycle only (epochs 1-2); the second trains with plain meProp
    assert [t for t, _ in run["dims_history"][1:]] == [0.5, 1.0, 1.5, 2.0]
    if reset:
        assert run["optimizer_resets"] == [1.5, 2.0, 3.5, 4.0]
        assert [c["optimizer_reset"] for c in run["checks"]] == [False, False, True, True] * 2
        assert printed.count("; new optimizer") == 4
        assert len(made) == 5
        # the first trained 15 minibatches, then 5, 15, 5 and 0 (made after the last)
        assert [_steps(o) for o in made] == [15, 5, 15, 5, 0]
    else:
        assert run["optimizer_resets"] == [] and "; new optimizer" not in printed
        assert len(made) == 1 and _steps(made[0]) == 40


def test_compare_simplify_gives_three_runs(tmp_path, capsys, fake, quick_inference):
    """--compare --simplify: dense, meProp and meSimp, interleaved; the dense and meProp
    runs train exactly as under a plain --compare (meSimp's checks change nothing of theirs)."""
    png = tmp_path / "cmp.png"
    argv = [a for a in SIMP if a != "--simplify"]
    result, printed = run_cli([*argv, "--compare", "--simplify", "--plot", str(png)], tmp_path, capsys)
    runs = result["runs"]
    assert [r["method"] for r in runs] == ["MLP 32d (dense)", "meProp top-8 (unified)",
                                           "meSimp top-8 (unified, prune 0.3)"]
    dense, meprop, mesimp = runs
    assert dense["k"] == 0 and meprop["k"] == mesimp["k"] == 8
    assert "final_dims" not in dense and "final_dims" not in meprop
    assert all(d < 32 for d in mesimp["final_dims"])
    for name in ("MLP 32d (dense)", "meProp top-8 (unified)", "meSimp top-8 (unified, prune 0.3)"):
        assert f"| {name} |" in printed
    assert printed.count(" - | - | - | - |") == 2  # dense and meProp rows: no simplification
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plain, _ = run_cli([*argv, "--compare"], tmp_path, capsys)
    for a, b in zip(plain["runs"], runs[:2]):
        assert [e["loss"] for e in a["epochs"]] == [e["loss"] for e in b["epochs"]]
        assert (a["dev_acc"], a["test_acc"]) == (b["dev_acc"], b["test_acc"])


def test_time_inference_interleaves_and_counts():
    calls = []

    class Probe(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            assert not torch.is_grad_enabled() and not self.training
            calls.append((self.name, len(x)))
            return x

    times = mnist.time_inference({"a": Probe("a"), "b": Probe("b")}, torch.zeros(25, 3), 10,
                                 torch.device("cpu"), reps=3)
    assert set(times) == {"a", "b"} and all(len(v) == 3 and min(v) > 0 for v in times.values())
    # one untimed pass each, then 3 timed ones, taking turns; batches of 10, 10, 5
    assert calls == [(n, b) for _ in range(4) for n in "ab" for b in (10, 10, 5)]


def test_plot_without_a_suffix_is_the_png_matplotlib_writes(tmp_path):
    """matplotlib adds .png to a name without a suffix: the path kept (and printed) is
    that file's."""
    a = mnist.parse_args(["--plot", str(tmp_path / "sub" / "curves")])
    assert a.plot_path == str(tmp_path / "sub" / "curves.png")


def _stop_in_epoch(monkeypatch, stop_at: int):
    """Make training stop (as Ctrl-C would) when a run starts its ``stop_at``-th epoch."""
    start = harness.Training.start_epoch

    def start_epoch(self):
        if len(self.epochs) + 1 == stop_at:
            raise KeyboardInterrupt
        start(self)

    monkeypatch.setattr(harness.Training, "start_epoch", start_epoch)


@pytest.mark.parametrize(
    "extra",
    [pytest.param(["--k", "8"], id="one-run"), pytest.param(["--k", "8", "--compare"], id="compare"),
     pytest.param(["--simplify", "--k", "8", "--train-cycle", "1"], id="mesimp"),
     pytest.param(["--simplify", "--k", "8", "--train-cycle", "1", "--compare"], id="compare-mesimp")],
)
def test_json_after_each_epoch_keeps_a_stopped_runs_epochs(extra, tmp_path, capsys, fake, monkeypatch, quick_inference):
    # --json is also written after each epoch but the last ("complete": false): a run
    # stopped in its third epoch leaves its first two epochs there, as the finished
    # two-epoch run has them, and writing it changes nothing in the training
    mnist.main([*TINY, "--n_epoch", "2", *extra])
    plain = capsys.readouterr().out
    finished, printed = run_cli([*TINY, "--n_epoch", "2", *extra], tmp_path / "done", capsys)
    assert finished["complete"] is True
    epoch_lines = re.compile(r"epoch +\d/2: loss (\S+), dev (\S+)%, test (\S+)%")
    assert epoch_lines.findall(plain) == epoch_lines.findall(printed)  # without --json, the same training
    out = tmp_path / "r.json"
    with monkeypatch.context() as m:
        _stop_in_epoch(m, 3)
        with pytest.raises(KeyboardInterrupt):
            mnist.main([*TINY, "--n_epoch", "4", *extra, "--json", str(out)])
    capsys.readouterr()
    partial = json.loads(out.read_text())
    assert partial["complete"] is False and partial["config"]["n_epoch"] == 4
    assert len(partial["runs"]) == len(finished["runs"]) == 1 + ("--compare" in extra) + ("--compare" in extra and "--simplify" in extra)
    for run, done in zip(partial["runs"], finished["runs"]):
        assert run["method"] == done["method"]
        for e, d in zip(run["epochs"], done["epochs"], strict=True):
            assert {n: e[n] for n in ("epoch", "loss", "dev_acc", "test_acc", "dims") if n in d} == {
                n: d[n] for n in ("epoch", "loss", "dev_acc", "test_acc", "dims") if n in d}
        best = max(run["epochs"], key=lambda e: (e["dev_acc"], -e["epoch"]))
        assert (run["best_epoch"], run["dev_acc"], run["test_acc"]) == (best["epoch"], best["dev_acc"], best["test_acc"])
        assert run["training_time_s"] == pytest.approx(sum(e["train_s"] for e in run["epochs"]))
        assert run["backprop_time_s"] == pytest.approx(sum(e["backprop_time_s"] for e in run["epochs"]))
        if run.get("simplify"):  # meSimp's history so far; its final model only at the end
            assert (run["dims_history"], run["checks"]) == (done["dims_history"], done["checks"])
            assert "final_dims" not in run and "inference_time_s" not in run
    assert "| Method (Adam, CPU) |" in partial["table"]
    if "--simplify" in extra:  # the sizes so far in the table, no inference times yet
        assert f"| {', '.join(map(str, partial['runs'][-1]['epochs'][-1]['dims']))} | - | - | - |" in partial["table"]
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["r.json"]  # no temporary file left


def test_write_json_keeps_a_link_the_mode_and_the_old_file_when_stopped(tmp_path, monkeypatch):
    # (the results file, written whole: to a temporary file renamed over the target)
    write = lambda path, n: harness.write_json(path, [{"n": n}], {}, torch.device("cpu"), "", 0.0)  # noqa: E731
    target = tmp_path / "results" / "r.json"
    write(target, 1)
    target.chmod(0o640)
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write(link, 2)  # through a link: the file it points to, the link kept
    assert link.is_symlink() and json.loads(target.read_text())["runs"] == [{"n": 2}]
    assert target.stat().st_mode & 0o777 == 0o640
    fresh = tmp_path / "fresh.json"
    write(fresh, 0)
    umask = os.umask(0)
    os.umask(umask)
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() makes a file
    harness.write_json(os.devnull, [], {}, torch.device("cpu"), "", 0.0)  # a device: written directly
    assert os.path.exists(os.devnull) and not os.path.isfile(os.devnull)

    def stopped(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(harness.os, "replace", stopped)
    with pytest.raises(KeyboardInterrupt):
        write(target, 3)  # stopped before the rename: the old file whole, no temporary left
    assert json.loads(target.read_text())["runs"] == [{"n": 2}]
    assert sorted(p.name for p in target.parent.iterdir()) == ["r.json"]


def test_an_unfinished_file_that_cannot_be_written_warns_and_training_goes_on(tmp_path, capsys, fake, monkeypatch):
    write = harness.write_json
    calls = []

    def failing(path, runs, config, device, table, total, *, complete=True):
        calls.append(complete)
        if not complete:
            raise OSError(28, "No space left on device")
        return write(path, runs, config, device, table, total, complete=complete)

    monkeypatch.setattr(harness, "write_json", failing)
    mnist.main([*TINY, "--n_epoch", "3", "--k", "8", "--json", str(tmp_path / "r.json")])
    result = json.loads((tmp_path / "r.json").read_text())
    assert calls == [False, False, True] and result["complete"] is True and len(result["runs"][0]["epochs"]) == 3
    err = capsys.readouterr().err
    assert err.count("warning: could not write the unfinished results") == 1 and "No space left" in err
