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
