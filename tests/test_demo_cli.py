"""``python -m meprop_triton.demo``: bad arguments are refused before the dense run
trains (a bad k would otherwise surface in convert, after it)."""

from __future__ import annotations

import pytest

from meprop_triton import demo


@pytest.mark.parametrize(
    "argv,pattern",
    [
        (["--k", "0"], "--k must be a fraction in"),
        (["--k", "nan"], "--k must be a fraction in"),
        (["--k", "1.5"], "--k must be a fraction in"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--batch", "0"], "--batch must be at least 1"),
        (["--hidden", "0"], "--hidden must be at least 1"),
        (["--device", "bogus"], "--device must be cpu, cuda"),
    ],
)
def test_bad_arguments_are_refused_before_training(argv, pattern, capsys, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("trained before refusing")

    monkeypatch.setattr(demo, "train", no_training)
    with pytest.raises(SystemExit) as e:
        demo.main(argv)
    assert e.value.code == 2
    assert pattern in capsys.readouterr().err


def test_the_demo_runs_and_reports_both_runs():
    """A tiny run end to end, in its own process (on a CPU the demo flushes denormals
    and sets malloc's options, for the whole process): both runs learn the clusters,
    and the table gives each one's backward and training time and speedup."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "meprop_triton.demo", "--hidden", "64", "--epochs", "2", "--batch", "256",
         "--k", "16"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "MLP 256-64-64-20, 2 epochs, batch 256, device cpu"
    header = "| method | backward time (s) | speedup | training time (s) | speedup | test accuracy (%) |"
    rows = lines[lines.index(header) + 2:]
    assert [r.split(" | ")[0] for r in rows] == ["| dense", "| meProp k=16"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[1]) > 0 and float(cells[3]) > 0
        assert cells[2].endswith("x") and cells[4].endswith("x")
        assert float(cells[5]) > 100 / 20 * 3, row  # well above chance (5% for 20 classes)
    assert rows[0].split(" | ")[2] == "1.00x"
