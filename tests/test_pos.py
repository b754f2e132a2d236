"""The POS command (meprop_triton.pos) on a tiny generated word/TAG corpus, offline."""

from __future__ import annotations

import json
import random

import pytest
import torch

from meprop_triton import datasets, harness, pos

TINY = ["--hidden", "16", "--epochs", "1", "--warmup-steps", "0", "--no-keep-freed-memory",
        "--no-flush-denormals"]


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def make_corpus(path, n=60, seed=0):
    """Sentences of determiner/noun/verb/adverb words, Brown-style markers on some tags."""
    rng = random.Random(seed)
    dets, nouns = ["the", "a", "every"], ["dog", "cat", "idea", "well-being", "R2D2"]
    verbs, advs = ["runs", "sleeps", "sees"], ["quickly", "often"]
    lines = []
    for _ in range(n):
        toks = [f"{rng.choice(dets).capitalize()}/at", f"{rng.choice(nouns)}/nn-tl",
                f"{rng.choice(verbs)}/vbz"]
        if rng.random() < 0.5:
            toks.append(f"{rng.choice(advs)}/rb")
        toks.append("./.")
        lines.append("\n\n\t" + " ".join(toks) + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines), encoding="utf-8")
    return path


def run_cli(argv, tmp_path):
    out = tmp_path / "r.json"
    pos.main([*argv, "--json", str(out)])
    return json.loads(out.read_text())


@pytest.mark.parametrize("tag,want", [
    ("nn-tl", "nn"), ("fw-at-tl", "at"), ("np-hl", "np"), ("jj-nc", "jj"), ("nn-tl-hl", "nn"),
    ("ppss+md", "ppss+md"), ("md*", "md*"), ("np$", "np$"), (".", "."), ("--", "--"), ("-tl", "-tl"),
])
def test_brown_tag(tag, want):
    assert pos.brown_tag(tag) == want


def test_split_is_fixed_disjoint_and_sized():
    sents = [f"s{i}" for i in range(1000)]
    a, b = pos.split_corpus(sents), pos.split_corpus(list(sents))
    assert a == b
    assert (len(a["test"]), len(a["dev"]), len(a["train"])) == (100, 100, 800)
    assert set(a["test"]).isdisjoint(a["dev"]) and set(a["dev"]).isdisjoint(a["train"])
    assert sorted(a["train"] + a["dev"] + a["test"]) == sorted(sents)
    assert a["test"] != sents[:100]  # shuffled, not the first files
    small = pos.split_corpus(sents, max_sentences=50)
    assert (len(small["test"]), len(small["dev"]), len(small["train"])) == (5, 5, 40)
    with pytest.raises(ValueError, match="2 sentences are too few"):
        pos.split_corpus(sents[:2])


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_features(tmp_path):
    sents = datasets.read_tagged_corpus(write(tmp_path / "c.txt", "Dogs/nns run/vb ./.\nDogs/nns ran/vbd\n"))
    f = pos.Features.from_sentences(sents)
    ids = f.encode(["Dogs", "DOGS", "x-1", "42", "zebra"])
    assert ids.shape == (5, 8)
    assert ids[:, 1].tolist() == [1, 2, 0, 4, 0]  # capitalisation pattern
    assert ids[:, 6].tolist() == [0, 0, 1, 2, 0]  # digits: none, some, all
    assert ids[:, 7].tolist() == [0, 0, 1, 0, 0]  # hyphen
    assert ids[0, 0] == ids[1, 0] != 0  # "dogs" seen twice: a known word, lowercased
    assert ids[4, 0] == 0 and ids[4, 2] == 0  # "zebra": unknown word and prefix
    assert f.sizes == [5, len(f.affixes[0]), len(f.affixes[1]), len(f.affixes[2]), len(f.affixes[3]), 3, 2]


def test_unseen_tags_are_counted_as_misses():
    S = datasets.TaggedSentence
    splits = {"train": [S(("a", "b"), ("x", "y"), "")], "dev": [S(("a",), ("x",), "")],
              "test": [S(("a", "c", "d"), ("x", "z-tl", "z"), "")]}
    data = pos.prepare_data(splits, pos.brown_tag)
    assert data["tags"] == ["x", "y"]
    assert data["unseen_tag_tokens"] == {"dev": 0, "test": 2}
    assert data["unseen_tags"]["test"] == ["z"]
    assert data["test"][0][1].tolist() == [0, -1, -1]


def test_cli_single_run_json(tmp_path, capsys):
    corpus = make_corpus(tmp_path / "corpus.txt")
    r = run_cli(["--corpus", str(corpus), "--k", "3", "--max-sentences", "40", *TINY], tmp_path)
    assert len(r["runs"]) == 1
    run = r["runs"][0]
    assert run["k"] == 3 and run["lstm"] == "MePropLSTM" and run["unified"] is True
    assert 0.0 <= run["test_acc"] <= 1.0 and 0.0 <= run["dev_acc"] <= 1.0
    assert 0.0 < run["backprop_time_s"] <= run["backward_time_s"] <= run["training_time_s"]
    assert len(run["epochs"]) == 1 and run["best_epoch"] == 1
    c = r["config"]
    assert (c["n_train"], c["n_dev"], c["n_test"]) == (32, 4, 4)
    assert c["tags"] == [".", "at", "nn", "rb", "vbz"]  # -tl removed
    assert "| Method (Adam, CPU) |" in r["table"]
    assert "meProp top-3 (unified)" in capsys.readouterr().out


def test_cli_flushes_denormals_on_cpu_by_default(tmp_path, capsys, monkeypatch):
    """On a CPU the command flushes denormals (log and JSON say so); --no-flush-denormals
    leaves them."""
    calls = []
    monkeypatch.setattr(pos, "flush_denormals", lambda: calls.append(1) or True)
    corpus = make_corpus(tmp_path / "corpus.txt")
    base = ["--corpus", str(corpus), "--k", "3", "--max-sentences", "40", "--device", "cpu",
            *(a for a in TINY if a != "--no-flush-denormals")]
    r = run_cli(base, tmp_path)
    assert calls == [1] and r["config"]["flush_denormals"] is True
    assert "denormals flushed to zero" in capsys.readouterr().out
    r = run_cli([*base, "--no-flush-denormals"], tmp_path)
    assert calls == [1] and r["config"]["flush_denormals"] is False
    assert "denormals flushed" not in capsys.readouterr().out


def test_cli_compare_and_plain_from_same_weights(tmp_path):
    corpus = make_corpus(tmp_path / "corpus.txt")
    # k = H: the meProp run must train exactly as the dense one (same code, same seed and order)
    png = tmp_path / "p.png"  # the plain run's backprop time is None: labelled n/a, not drawn
    r = run_cli(["--corpus", str(corpus), "--compare", "--plain-lstm", "--k", "16",
                 "--max-sentences", "30", "--plot", str(png), *TINY], tmp_path)
    assert png.stat().st_size > 0
    assert "| LSTM 16 (plain nn.LSTM) | - | - |" in r["table"]
    runs = r["runs"]
    assert [(x["k"], x["lstm"]) for x in runs] == [(0, "MePropLSTM"), (16, "MePropLSTM"), (0, "nn.LSTM")]
    dense, meprop, plain = runs
    assert dense["k_units"] == 16 and plain["backprop_time_s"] is None
    assert meprop["epochs"][0]["loss"] == dense["epochs"][0]["loss"]
    assert meprop["test_acc"] == dense["test_acc"]
    assert plain["epochs"][0]["loss"] == pytest.approx(dense["epochs"][0]["loss"], rel=1e-4)


def test_cli_compare_two_runs_and_plot(tmp_path):
    corpus = make_corpus(tmp_path / "corpus.txt")
    png = tmp_path / "p.png"
    r = run_cli(["--corpus", str(corpus), "--compare", "--k", "2", "--batch-size", "4",
                 "--no-unified", "--optimizer", "adagrad", "--max-sentences", "30", "--plot", str(png),
                 *TINY], tmp_path)
    assert [x["k"] for x in r["runs"]] == [0, 2]
    assert r["runs"][1]["unified"] is False and r["config"]["lr"] == 0.01
    assert r["runs"][0]["epochs"][0]["loss"] != r["runs"][1]["epochs"][0]["loss"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_corpus_directory(tmp_path):
    make_corpus(tmp_path / "c" / "a.txt", n=20, seed=1)
    make_corpus(tmp_path / "c" / "b.txt", n=20, seed=2)
    r = run_cli(["--corpus", str(tmp_path / "c"), "--k", "3", "--threads", "1", *TINY], tmp_path)
    assert r["config"]["n_sentences"] == 40
    assert r["config"]["threads"] == r["config"]["torch_threads"] == 1


def test_cli_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("good/nn\n\nThe/at dog\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"bad\.txt:3: token 'dog' is not word/TAG"):
        pos.main(["--corpus", str(bad), *TINY])
    with pytest.raises(SystemExit, match="does not exist"):
        pos.main(["--corpus", str(tmp_path / "missing"), *TINY])
    with pytest.raises(SystemExit, match="too few"):
        pos.main(["--corpus", str(make_corpus(tmp_path / "c.txt")), "--max-sentences", "2", *TINY])
    with pytest.raises(SystemExit):
        pos.parse_args(["--compare", "--k", "0"])
    with pytest.raises(SystemExit):
        pos.parse_args(["--k", "-1"])


def test_tagger_shares_initial_weights(tmp_path):
    f = pos.Features.from_sentences(datasets.read_tagged_corpus(write(tmp_path / "c.txt", "a/x b/y\n")))
    torch.manual_seed(0)
    a = pos.Tagger(f, 2, 8, k=3)
    torch.manual_seed(0)
    b = pos.Tagger(f, 2, 8, k=None)
    assert type(b.lstm) is torch.nn.LSTM and type(a.lstm).__name__ == "MePropLSTM"
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)


@pytest.mark.parametrize("compare", [False, True], ids=["one-run", "compare"])
def test_json_after_each_epoch_keeps_a_stopped_runs_epochs(compare, tmp_path, monkeypatch):
    # as meprop-mnist's: rewritten after each epoch ("complete": false) until the end
    corpus = make_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "out" / "r.json"
    start = harness.Training.start_epoch

    def start_epoch(self):
        if len(self.epochs) == 2:
            raise KeyboardInterrupt  # as Ctrl-C in the third epoch
        start(self)

    monkeypatch.setattr(harness.Training, "start_epoch", start_epoch)
    argv = ["--corpus", str(corpus), "--k", "3", "--max-sentences", "40", *TINY, "--epochs", "3",
            *(["--compare"] if compare else []), "--json", str(out)]
    with pytest.raises(KeyboardInterrupt):
        pos.main(argv)
    r = json.loads(out.read_text())
    assert r["complete"] is False and r["config"]["epochs"] == 3
    assert [[e["epoch"] for e in run["epochs"]] for run in r["runs"]] == [[1, 2]] * (2 if compare else 1)
    assert r["runs"][-1]["lstm"] == "MePropLSTM" and "| Method (Adam, CPU) |" in r["table"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.json"]
    monkeypatch.undo()
    pos.main(argv)
    r = json.loads(out.read_text())
    assert r["complete"] is True and [len(run["epochs"]) for run in r["runs"]] == [3] * (2 if compare else 1)
