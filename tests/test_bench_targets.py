"""bench/targets.py (speed targets as data), bench/timing.host_launch_seconds and the
report's target column: no GPU, no timing of real work."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: bench/ is not installed
from bench import report, targets  # noqa: E402
from bench.targets import Target, check_targets  # noqa: E402
from bench.timing import host_and_loop_seconds, host_launch_seconds  # noqa: E402


class FakeBenchmark:
    def __init__(self, name="test_case[x]"):
        self.name = name
        self.extra_info = {}


class FakeConfig:
    def __init__(self, assert_targets=False, registered=True):
        self._value = assert_targets
        self._registered = registered

    def getoption(self, name):
        if not self._registered:
            raise ValueError(f"no option named {name!r}")
        assert name == targets.ASSERT_OPTION
        return self._value


@pytest.fixture(autouse=True)
def _fresh_unmet(monkeypatch):
    monkeypatch.setattr(targets, "UNMET", [])


def test_met_least_target_recorded():
    b = FakeBenchmark()
    assert check_targets(b, FakeConfig(), Target("speedup_vs_dense", least=2.0), {"speedup_vs_dense": 2.5})
    assert b.extra_info["target"] == {"metric": "speedup_vs_dense", "least": 2.0, "value": 2.5, "met": True}
    assert b.extra_info["target_met"] is True
    assert targets.UNMET == []


def test_bound_itself_counts_as_met():
    b = FakeBenchmark()
    assert check_targets(b, FakeConfig(True), Target("speedup_vs_dense", least=2.0), {"speedup_vs_dense": 2.0})
    assert check_targets(b, FakeConfig(True), Target("overhead_us", most=15), {"overhead_us": 15.0})


def test_unmet_target_recorded_not_raised_by_default():
    b = FakeBenchmark("test_forward_overhead[cpu]")
    met = check_targets(b, FakeConfig(), Target("overhead_us", most=15), {"overhead_us": 15.5}, context="ctx")
    assert met is False
    assert b.extra_info["target"] == {"metric": "overhead_us", "most": 15, "value": 15.5, "met": False}
    assert b.extra_info["target_met"] is False
    assert len(targets.UNMET) == 1
    assert targets.UNMET[0].startswith("test_forward_overhead[cpu]: overhead_us = 15.5, target overhead_us <= 15")
    assert "ctx" in targets.UNMET[0]


def test_unmet_target_raises_under_assert_targets():
    b = FakeBenchmark()
    with pytest.raises(AssertionError, match=r"target not met: speedup_vs_dense = 1\.5, target speedup_vs_dense >= 2"):
        check_targets(b, FakeConfig(True), Target("speedup_vs_dense", least=2.0), {"speedup_vs_dense": 1.5})
    # recorded before raising, so the JSON still says what happened
    assert b.extra_info["target_met"] is False


def test_option_not_registered_means_no_assert():
    b = FakeBenchmark()
    cfg = FakeConfig(True, registered=False)
    assert not check_targets(b, cfg, Target("speedup_vs_dense", least=2.0), {"speedup_vs_dense": 1.0})
    assert not targets.assert_targets(None)


def test_several_targets_all_must_be_met():
    b = FakeBenchmark()
    two = [Target("speedup_vs_dense", least=5.0), Target("speedup_vs_torch", least=1.5)]
    met = check_targets(b, FakeConfig(), two, {"speedup_vs_dense": 6.0, "speedup_vs_torch": 1.2})
    assert met is False
    assert [r["met"] for r in b.extra_info["target"]] == [True, False]
    assert b.extra_info["target_met"] is False
    assert "speedup_vs_torch = 1.2" in targets.UNMET[0] and "speedup_vs_dense" not in targets.UNMET[0].split(":", 1)[1]
    with pytest.raises(AssertionError, match="speedup_vs_torch"):
        check_targets(b, FakeConfig(True), two, {"speedup_vs_dense": 6.0, "speedup_vs_torch": 1.2})
    assert check_targets(b, FakeConfig(True), two, {"speedup_vs_dense": 6.0, "speedup_vs_torch": 1.6})
    assert b.extra_info["target_met"] is True


@pytest.mark.parametrize("value", [float("nan"), None])
def test_nothing_measured_is_not_met(value):
    b = FakeBenchmark()
    assert not check_targets(b, FakeConfig(), Target("speedup_vs_dense", least=1.0), {"speedup_vs_dense": value})
    with pytest.raises(AssertionError, match="speedup_vs_dense"):
        check_targets(b, FakeConfig(True), Target("speedup_vs_dense", least=1.0), {"speedup_vs_dense": value})


def test_bad_targets_refused():
    with pytest.raises(ValueError, match="exactly one of least= and most="):
        Target("x")
    with pytest.raises(ValueError, match="exactly one of least= and most="):
        Target("x", least=1, most=2)
    with pytest.raises(KeyError, match="speedup_vs_torch"):
        check_targets(FakeBenchmark(), FakeConfig(), Target("speedup_vs_torch", least=1), {"speedup_vs_dense": 2})
    with pytest.raises(ValueError, match="at least one target"):
        check_targets(FakeBenchmark(), FakeConfig(), [], {})


def test_report_shows_met_and_not_met():
    met = {"target": {"metric": "speedup_vs_dense", "least": 2.0, "value": 2.5, "met": True}, "target_met": True}
    unmet = {"target": [{"metric": "speedup_vs_dense", "least": 5.0, "value": 6.0, "met": True},
                        {"metric": "speedup_vs_torch", "least": 1.5, "value": 1.2, "met": False}],
             "target_met": False}
    assert report.fmt_target(met) == "speedup_vs_dense >= 2: met (2.5)"
    assert report.fmt_target(unmet) == "speedup_vs_dense >= 5: met (6); speedup_vs_torch >= 1.5: **NOT MET** (1.2)"
    assert report.fmt_target({}) == ""


def test_report_names_every_kind_of_case():
    """Layers, MLPs and LSTMs (which give their sizes as fields, not a shape) each get a
    readable label; the after-training step cases say how many steps and whether
    denormals were flushed, with the denormal shares."""
    assert report.fmt_shape([50, 784, 500], None) == "50 x 784->500"
    assert report.fmt_shape([50, 784, 500, 500, 10], None) == "MLP 784-500-500-10, batch 50"
    lstm = {"input_size": 190, "hidden": 500, "batch": 32, "steps": 25}
    assert report.fmt_shape([], None, lstm) == "LSTM 190->500, batch 32, 25 steps"
    assert report.fmt_shape(None, "mlp-x") == "mlp-x"
    lstm_case = {"name": "t", "group": "lstm-sparse-grad-cpu-21x1x190->500", "stats": {"median": 6e-3},
                 "extra_info": {"mode": "sparse_grad", "k": 5, "optimizer": "adagrad", "device_type": "cpu",
                                "time_median_s": 6e-3, **lstm}}
    line = report.case_table({"benchmarks": [lstm_case]})[-1]
    assert line.startswith("| lstm-sparse-grad-cpu-21x1x190->500 | - | sparse_grad | - | LSTM 190->500, batch 32, "
                           "25 steps | 5 | - | 6.00 ms |"), line  # no field shows as None
    step = {"name": "t", "group": "train-step-cpu-mlp-mnist-784-500-500-10-adam-fused-after-training",
            "stats": {"median": 2e-3},
            "extra_info": {"mode": "unified-topk", "speedup_vs_dense": 0.64, "shape": [50, 784, 500, 500, 10],
                           "grad": "dense", "optimizer": "Adam (fused)", "k": 80, "dense_median_s": 1.9e-3,
                           "pretrain_steps": 1000, "flush_denormals": False,
                           "denormal_share_meprop": 0.154, "denormal_share_dense": 0.003}}
    header, rule, line = report.training_table({"benchmarks": [step]})
    assert "after 1000 steps, denormals kept (in Adam's state: meProp 15.4%, dense 0.3%)" in line
    assert line.endswith("| 0.64x |")
    zoo = {"name": "t", "group": "train-step-cpu-bert-4x256-b8x128", "stats": {"median": 6e-2},
           "extra_info": {"mode": "unified-topk", "speedup_vs_dense": 1.33, "shape": [1024, 256, 1024],
                          "shape_name": "bert-4x256", "model": "bert", "grad": "dense",
                          "optimizer": "Adam (fused)", "k_requested": 0.1, "k": 26, "k_ffn": 103,
                          "dense_median_s": 8e-2, "time_median_s": 6e-2,
                          "dense_forward_ms": 28.5, "meprop_forward_ms": 29.2,
                          "dense_backward_ms": 50.0, "meprop_backward_ms": 28.2}}
    _, _, line = report.training_table({"benchmarks": [zoo]})
    assert line.startswith("| bert-4x256, 1024 tokens; dense / meProp forward 28.5 / 29.2 ms, "
                           "backward 50.0 / 28.2 ms | dense | Adam (fused) | k=0.1 (26 of 256, 103 of 1024) |")
    assert line.endswith("| 1.33x |")


def test_report_notes_the_host_time_and_triton_launch_path():
    """A GPU case's notes give its host time per eager call, and where it was taken, the
    same call's through Triton's own launch path (``FastLaunch`` off)."""
    e = {"device_type": "cuda", "host_launch_us": 141.6}
    assert report.notes(e) == "host 142 us per call"
    e["host_launch_us_triton_path"] = 180.2
    assert report.notes(e) == "host 142 us per call (180 us through Triton's launch path)"


def test_report_merges_files_of_one_machine_and_refuses_two():
    def data(gpu, cmd, n):
        return {
            "machine_info": {"meprop": {"gpu": gpu, "command": cmd}},
            "benchmarks": [{"name": f"t{i}", "group": "g", "extra_info": {}, "stats": {"median": 1.0}} for i in range(n)],
        }
    h200 = {"name": "NVIDIA H200", "capability": "9.0", "count": 1}
    merged = report.merge([data(h200, "a", 2), data(h200, "b", 3)], ["a.json", "b.json"])
    assert len(merged["benchmarks"]) == 5
    assert merged["commands"] == [("a.json", "a"), ("b.json", "b")]
    a100 = {"name": "NVIDIA A100", "capability": "8.0", "count": 1}
    with pytest.raises(SystemExit, match="different machines"):
        report.merge([data(h200, "a", 1), data(a100, "b", 1)], ["a.json", "b.json"])


def test_host_launch_syncs_only_around_the_calls():
    events = []
    sleep = 0.002

    def fn():
        events.append("call")
        time.sleep(sleep)

    t = host_launch_seconds(fn, calls=7, sync=lambda: events.append("sync"))
    assert events == ["sync"] + ["call"] * 7 + ["sync"]
    assert sleep <= t < sleep + 0.05
    with pytest.raises(ValueError, match="calls must be at least 1"):
        host_launch_seconds(fn, calls=0)


def test_the_spin_before_a_timed_call_outlasts_its_host_side():
    from bench import timing

    assert timing.lead_cycles(0.0) == timing._HOST_LEAD_CYCLES  # never below ~200 us
    # 1 ms of host time: a 1.5 ms spin at the clock the cycles are counted in
    assert timing.lead_cycles(1e-3) == int(1.5e-3 * timing._SPIN_HZ)
    assert timing.lead_cycles(1.0) == 40_000_000  # capped at ~20 ms


def test_the_eager_loop_time_counts_the_final_sync():
    """A GPU still busy after the last launch (a sync that waits) shows in the loop's time
    per call, not in the host time of a call."""
    events = []
    sleep, tail, calls = 0.002, 0.03, 5

    def fn():
        events.append("call")
        time.sleep(sleep)

    def sync():
        events.append("sync")
        if len(events) > 1:  # the one after the calls: the GPU's work left
            time.sleep(tail)

    host, loop = host_and_loop_seconds(fn, calls=calls, sync=sync)
    assert events == ["sync"] + ["call"] * calls + ["sync"]
    assert sleep <= host < sleep + 0.01
    assert sleep + tail / calls <= loop < sleep + tail / calls + 0.02


def test_assert_targets_option_is_registered(pytestconfig):
    """bench/conftest.py registers --assert-targets when the suite is loaded."""
    from bench import conftest

    seen = {}
    parser = SimpleNamespace(addoption=lambda *a, **kw: seen.update({a[0]: kw}))
    conftest.pytest_addoption(parser)
    assert seen["--assert-targets"]["dest"] == targets.ASSERT_OPTION
    assert seen["--assert-targets"]["action"] == "store_true"


def test_report_takes_a_partial_record_and_writes_the_table_before_the_plot(tmp_path, monkeypatch, capsys):
    """A group whose run died before pytest-benchmark wrote its JSON leaves the
    ``*.partial.jsonl`` record (bench/conftest.py): the report merges it with the other
    groups' JSON (a line cut off mid-write dropped), and a plot that fails costs the PNG
    alone, not the Markdown table."""
    real = json.loads((Path(__file__).resolve().parents[1] / "bench/results/cpu-xeon-2026-12-02.json").read_text())
    cases = [b for b in real["benchmarks"] if b["extra_info"].get("speedup_vs_dense")][:4]
    assert len(cases) == 4
    whole = tmp_path / "a.json"
    whole.write_text(json.dumps({**real, "benchmarks": cases[:2]}))
    partial = tmp_path / "b.partial.jsonl"
    head = {"machine_info": real["machine_info"], "commit_info": {"id": "0123456789abcdef"}, "datetime": real["datetime"]}
    lines = [json.dumps(head)] + [json.dumps({"benchmark": c}) for c in cases[2:]]
    partial.write_text("\n".join(lines) + "\n" + json.dumps({"benchmark": cases[0]})[:40])
    loaded = report._load(str(partial))
    assert [b["name"] for b in loaded["benchmarks"]] == [c["name"] for c in cases[2:]]
    assert loaded["commit_info"]["id"] == "0123456789abcdef"

    def broken_plot(data, png):
        raise RuntimeError("no display")

    monkeypatch.setattr(report, "plot", broken_plot)
    md = tmp_path / "r.md"
    report.main([str(whole), str(partial), "--md", str(md), "--png", str(tmp_path / "r.png")])
    text = md.read_text()
    assert "no PNG written (RuntimeError: no display)" in capsys.readouterr().err
    assert "![" not in text and not (tmp_path / "r.png").exists()
    assert "b.partial.jsonl" in text  # named among the files the report covers
    every_case = text.split("## Every case", 1)[1]
    assert every_case.count("\n| backward-") == 4  # two cases from each file
    assert "| 5 (1%) | float32 |" in every_case and "| 10 (2%) | float32 |" in every_case  # the partial's


def test_recorded_commit_names_a_copy_without_git(tmp_path):
    from bench import conftest

    f = tmp_path / "COMMIT"
    assert conftest.recorded_commit(str(f)) == {}
    f.write_text("abc123\n")
    assert conftest.recorded_commit(str(f)) == {"id": "abc123", "dirty": False, "source": "bench/COMMIT"}
    f.write_text("abc123\n M meprop_triton/nn.py\n")
    assert conftest.recorded_commit(str(f))["dirty"] is True
    info = {}
    conftest.pytest_benchmark_update_commit_info(None, info)  # a git checkout: git's own, untouched
    assert info == {} or info.get("id")


def test_a_commit_file_that_differs_from_git_is_kept_beside_it(monkeypatch):
    """The H200 machine's .git named the session's first commit while the tree sent was
    newer: bench/COMMIT's id is kept next to git's, and the report shows both."""
    from bench import conftest, report

    monkeypatch.setattr(conftest, "recorded_commit", lambda path=None: {"id": "newer1234567", "dirty": True,
                                                                         "source": "bench/COMMIT"})
    info = {"id": "older7654321", "dirty": True}
    conftest.pytest_benchmark_update_commit_info(None, info)
    assert info == {"id": "older7654321", "dirty": True, "commit_file": "newer1234567"}
    same = {"id": "newer1234567", "dirty": False}
    conftest.pytest_benchmark_update_commit_info(None, same)
    assert "commit_file" not in same  # git and the file agree: nothing added
    none = {"id": "unversioned"}
    conftest.pytest_benchmark_update_commit_info(None, none)
    assert none["id"] == "newer1234567" and none["source"] == "bench/COMMIT"
    head = "\n".join(report.header({"commit_info": info, "machine_info": {}, "benchmarks": []}))
    assert "older76543 (uncommitted changes); bench/COMMIT, written with the tree sent, says newer12345" in head


def test_codegen_table_of_failed_compiles_only():
    """Every compile failed (e.g. no writable Triton cache): the table still prints."""
    from bench import codegen

    text = codegen.table([{"name": "scores.partial_kernel", "config": "c", "error": "PermissionError: cache"}])
    assert "ERROR: PermissionError: cache" in text
