"""The README's Python examples, run as written.

Each ```python block of README.md is taken from the file at test time and executed
unchanged, in a fresh namespace and a temporary working folder; the test then checks
what the example claims (its printed output, the layers it converts, the gradients it
makes). A README edit that breaks an example fails here, and so does a new example this
file does not run (``test_every_example_is_run``).

Nothing is downloaded: ``from_pretrained("bert-base-uncased")`` and ``("gpt2")`` build the
same architectures from their default configs with random weights (the hub is switched
off); a local folder loads for real. The transformers and timm examples need the optional
extra (``pip install -e '.[zoo]'``) and skip without it, with the reason; CI runs them in
its zoo step. The DDP example runs under ``torchrun`` with two CPU (gloo) processes.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from meprop_triton import MePropConv1D, MePropLinear, MePropLSTM  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"

# Each example, by a line only it has. The names key the tests below.
EXAMPLES = {
    "quickstart": 'convert(model, k=0.25, exclude=["classifier"])',
    "transformers": 'BertForSequenceClassification.from_pretrained("bert-base-uncased", num_labels=3)',
    "timm": 'vit = timm.create_model("vit_small_patch16_224", num_classes=10)\nconvert(vit',
    "another-k": 'convert(vit, k=0.2, exclude=lambda name, m: not name.endswith("attn.qkv"))',
    "save-and-load": 'gpt2.config.meprop = meprop_settings(gpt2)',
    "ddp": 'model = DDP(model',
    "torch-func": 'per_sample = vmap(grad(sample_loss)',
    "sparse-optimizers": 'opts = [torch.optim.SparseAdam(sparse, lr=1e-3)',
    "lstm": 'lstm = MePropLSTM(190, 500, k=5, batch_first=True)',
    "simplifier": 'simp = Simplifier(model, opt, prune=0.1)',
}


#: a fence line (CommonMark): three or more backticks or tildes, maybe indented, then the
#: block's language
FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})[ \t]*([^`\s]*)")
LANGUAGES = {"python", "bash", ""}  # "": output, shown as it prints


def fenced_blocks(*, prose: list | None = None) -> list[tuple[str, int, str]]:
    """(language as written, first line number, dedented source) of every fenced block of
    the README, in order; the lines outside them are appended to ``prose`` if given. A
    block closes at a fence of its own character, at least as long, with no language."""
    blocks, block = [], None
    for number, line in enumerate(README.read_text(encoding="utf-8").splitlines(), 1):
        m = FENCE.match(line)
        if block is None:
            if m:
                block = (m.group(1), m.group(2), number + 1, [])
            elif prose is not None:
                prose.append(line)
        elif m and m.group(1)[0] == block[0][0] and len(m.group(1)) >= len(block[0]) and not m.group(2):
            blocks.append((block[1], block[2], textwrap.dedent("\n".join(block[3]) + "\n")))
            block = None
        else:
            block[3].append(line)
    assert block is None, f"README.md: the block opened at line {block[2] - 1} is never closed"
    return blocks


def python_blocks() -> list[tuple[int, str]]:
    """(first line number, source) of every ```python block of the README."""
    return [(start, src) for language, start, src in fenced_blocks() if language == "python"]


def test_every_block_names_a_language_this_file_knows():
    """A Python example fenced as ```py, ```Python or ```python3, or left unlabelled,
    would never run here: each block is ```python, ```bash or unlabelled output, and an
    unlabelled one is not Python code."""
    for language, start, src in fenced_blocks():
        assert language in LANGUAGES, f"README.md:{start - 1}: a block fenced as {language!r}; use one of {sorted(LANGUAGES)}"
        if language == "":
            try:
                tree = ast.parse(src)
            except SyntaxError:
                continue
            assert not any(isinstance(n, (ast.Import, ast.ImportFrom, ast.Call)) for n in ast.walk(tree)), (
                f"README.md:{start - 1}: an unlabelled block that is Python code; fence it as ```python")


def example(name: str) -> tuple[int, str]:
    found = [(n, src) for n, src in python_blocks() if EXAMPLES[name] in src]
    assert len(found) == 1, (
        f"README.md has {len(found)} python examples holding {EXAMPLES[name]!r} (the {name!r} "
        f"example); expected exactly one: update EXAMPLES in {Path(__file__).name}")
    return found[0]


def run_example(name: str, namespace: dict | None = None) -> dict:
    """Execute the example in ``namespace`` (a fresh one by default); tracebacks name
    README.md and the line."""
    line, src = example(name)
    code = compile("\n" * (line - 1) + src, str(README), "exec")
    namespace = {"__name__": f"readme_{name}"} if namespace is None else namespace
    exec(code, namespace)  # noqa: S102 - the README's own example, run as a user runs it
    return namespace


def test_every_example_is_run():
    unmatched = [(n, src.splitlines()[0]) for n, src in python_blocks()
                 if not any(marker in src for marker in EXAMPLES.values())]
    assert not unmatched, f"README.md python examples that no test runs: {unmatched}"
    for name in EXAMPLES:
        example(name)


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading: lower case, punctuation other than
    hyphens dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_within_the_readme_resolve():
    """Every ``(#fragment)`` link names a heading of the README, and every relative link
    a file of the checkout."""
    prose: list[str] = []
    fenced_blocks(prose=prose)  # a "# comment" in a block is no heading
    text = "\n".join(prose)
    anchors = {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}
    fragments = re.findall(r"\]\(#([^)]+)\)", text)
    assert fragments, "the README links to none of its sections (its contents line)"
    assert not [f for f in fragments if f not in anchors], sorted(anchors)
    files = re.findall(r"\]\(([^)#:]+)\)", text)
    assert not [f for f in files if not (README.parent / f).is_file()], files


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write files (out/, vit.pt) where they run
    torch.manual_seed(0)
    return tmp_path


def test_quickstart(in_tmp, capsys):
    ns = run_example("quickstart")
    out = capsys.readouterr().out
    assert out.count("MePropLinear(in_features=784, out_features=500, bias=True, k=0.25)") == 1
    assert out.count("MePropLinear(in_features=500, out_features=500, bias=True, k=0.25)") == 1
    assert "(classifier): Linear(in_features=500, out_features=10, bias=True)" in out
    model = ns["model"]
    assert isinstance(ns["layer"], MePropLinear) and ns["layer"].k == 80
    # the backward kept 125 of 500 units per layer: the other weight rows got no gradient
    for i in (0, 2):
        rows = model[i].weight.grad.abs().sum(1).count_nonzero().item()
        assert 0 < rows <= 125, (i, rows)
    assert model.classifier.weight.grad.abs().sum(1).count_nonzero().item() == 10


def test_torch_func_per_sample_gradients(in_tmp, capsys):
    ns = run_example("torch-func")
    printed = capsys.readouterr().out
    assert "'0.weight': (16, 64, 20)" in printed and "'2.weight': (16, 5, 64)" in printed
    g = ns["per_sample"]["0.weight"]
    rows = g.abs().sum(-1).count_nonzero(-1)  # per sample: the units its own backward kept
    assert (rows > 0).all() and (rows <= 8).all(), rows
    assert ns["per_sample"]["2.weight"].abs().sum(-1).count_nonzero(-1).eq(5).all()  # dense head


def test_sparse_optimizers(in_tmp):
    model = nn.Sequential(OrderedDict(hidden=nn.Linear(20, 40), act=nn.ReLU(),
                                      classifier=nn.Linear(40, 5)))
    from meprop_triton import convert  # the fragment follows the README's earlier imports

    ns = run_example("sparse-optimizers", {"torch": torch, "nn": nn, "convert": convert, "model": model})
    model, opts = ns["model"], ns["opts"]
    before = model.hidden.weight.detach().clone()
    loss = nn.functional.cross_entropy(model(torch.randn(8, 20)), torch.randint(0, 5, (8,)))
    for opt in opts:
        opt.zero_grad()
    loss.backward()
    assert model.hidden.weight.grad.layout == torch.sparse_coo
    assert model.classifier.weight.grad.layout == torch.strided
    for opt in opts:
        opt.step()
    moved = (model.hidden.weight.detach() != before).any(1).sum().item()
    assert 0 < moved <= 2, moved  # k = 5% of 40 units: 2 rows


def test_lstm(in_tmp, capsys):
    ns = run_example("lstm")
    assert capsys.readouterr().out == "MePropLSTM\n"
    lstm = ns["lstm"]
    assert isinstance(lstm, MePropLSTM) and lstm.batch_first
    assert ns["out"].shape == (2, 25, 500) and ns["h"].shape == (1, 2, 500)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lstm.parameters())
    assert isinstance(ns["model"]["rnn"], MePropLSTM)
    assert type(ns["model"]["classifier"]) is nn.Linear


def test_simplifier(in_tmp, capsys):
    ns = run_example("simplifier")
    printed = capsys.readouterr().out.strip()
    dims = ns["simp"].dims()
    assert printed == str(dims)
    assert set(dims) == {"0", "2"}
    assert all(0 < d < 500 for d in dims.values()), dims  # both hidden layers were pruned
    model = ns["model"]
    assert model[0].out_features == dims["0"] and model[2].in_features == dims["0"]
    assert model[2].out_features == dims["2"] and model[4].in_features == dims["2"]
    loss = nn.functional.cross_entropy(model(torch.randn(4, 784)), torch.randint(0, 10, (4,)))
    loss.backward()  # the simplified model still trains


# --- the DDP example, under torchrun -------------------------------------------------------

@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with the gloo backend is not available in this torch build")
def test_ddp_under_torchrun(in_tmp):
    line, src = example("ddp")
    assert src.startswith("# train_ddp.py; run with: torchrun --nproc_per_node 2 train_ddp.py")
    script = in_tmp / "train_ddp.py"
    # the README's lines at their README line numbers, so a traceback points at the README
    # then each rank saves its model: DDP keeps the ranks' weights identical
    script.write_text("\n" * (line - 1) + src
                      + "\ntorch.save({'kinds': [type(m).__name__ for m in model.module],"
                      + " 'state': model.module.state_dict()}, f'rank{rank}.pt')\n")
    # on the CPU with gloo, as the example does without a GPU (with one, it would want two)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    # --standalone: a free port of its own, so parallel test workers do not collide
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    try:
        proc = subprocess.run(cmd, cwd=in_tmp, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun of the README's DDP example did not finish in 240 s: {e.stdout}\n{e.stderr}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(in_tmp / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["kinds"] == ["MePropLinear", "ReLU", "MePropLinear", "ReLU", "Linear"]
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 500), nn.ReLU(), nn.Linear(500, 10))
    for name, v in ranks[0]["state"].items():
        assert torch.equal(v, ranks[1]["state"][name]), name  # the ranks agree after 5 steps
        assert not torch.equal(v, fresh.state_dict()[name]), name  # and trained


# --- transformers and timm (the zoo extra) ------------------------------------------------

def _usable(module: str):
    try:
        __import__(module)
    except Exception as e:  # noqa: BLE001 - any failure to import is a reason to skip
        return f"{module} is not usable here (the optional extra: pip install -e '.[zoo]'): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


TRANSFORMERS_SKIP = _usable("transformers")
TIMM_SKIP = _usable("timm")
needs_transformers = pytest.mark.skipif(TRANSFORMERS_SKIP is not None, reason=TRANSFORMERS_SKIP or "")
needs_timm = pytest.mark.skipif(TIMM_SKIP is not None, reason=TIMM_SKIP or "")


@pytest.fixture
def offline_hub(monkeypatch):
    """``from_pretrained`` of the README's two hub names builds the architecture from its
    default config (bert-base-uncased's and gpt2's shapes) with random weights; any other
    name (a local folder) loads for real."""
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    for cls, hub_name, config_cls in ((BertForSequenceClassification, "bert-base-uncased", BertConfig),
                                      (GPT2LMHeadModel, "gpt2", GPT2Config)):
        real = cls.from_pretrained

        def from_pretrained(name, *args, _cls=cls, _hub=hub_name, _config=config_cls, _real=real, **kwargs):
            if name != _hub:
                return _real(name, *args, **kwargs)
            assert not args, args
            return _cls(_config(**kwargs)).eval()  # from_pretrained returns the model in eval mode

        monkeypatch.setattr(cls, "from_pretrained", from_pretrained)


def _count(model, cls) -> int:
    return sum(type(m) is cls for m in model.modules())


@needs_transformers
def test_transformers(in_tmp, offline_hub, capsys):
    ns = run_example("transformers")
    printed = capsys.readouterr().out
    assert printed.startswith("meProp convert: 73 layer(s) converted (73 Linear), 1 left dense\n"), printed[:300]
    assert "left dense  classifier: excluded" in printed
    bert, gpt2 = ns["bert"], ns["gpt2"]
    assert _count(bert, MePropLinear) == 73 and _count(bert, nn.Linear) == 1
    assert _count(bert.bert.encoder, MePropLinear) == 72 and type(bert.bert.pooler.dense) is MePropLinear
    assert _count(gpt2, MePropConv1D) == 48 and type(gpt2.lm_head) is nn.Linear
    assert "tied" in ns["report"].left_dense["lm_head"]
    out = gpt2(torch.randint(0, 50257, (1, 8)), labels=torch.randint(0, 50257, (1, 8)))
    out.loss.backward()
    assert gpt2.transformer.h[0].mlp.c_fc.weight.grad is not None


@needs_timm
def test_timm(in_tmp):
    ns = run_example("timm", {"convert": __import__("meprop_triton").convert})
    vit = ns["vit"]
    blocks = len(vit.blocks)
    assert _count(vit, MePropLinear) == 4 * blocks and type(vit.head) is nn.Linear
    for b in vit.blocks:
        assert all(type(m) is MePropLinear for m in (b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2))


@needs_timm
def test_another_k_for_some_layers(in_tmp):
    ns = run_example("timm", {"convert": __import__("meprop_triton").convert})
    run_example("another-k", ns)
    vit = ns["vit"]
    assert type(vit.head) is nn.Linear
    for b in vit.blocks:
        assert b.attn.qkv.k == 0.2
        assert b.attn.proj.k == b.mlp.fc1.k == b.mlp.fc2.k == 0.05
    # what the README says of the second call's report
    _, report = ns["convert"](vit, k=0.2, exclude=lambda name, m: not name.endswith("attn.qkv"), report=True)
    blocks = len(vit.blocks)
    assert (len(report.converted), len(report.unchanged), list(report.left_dense)) == (blocks, 3 * blocks, ["head"])


@needs_transformers
@needs_timm
def test_save_and_load(in_tmp, offline_hub):
    ns = run_example("transformers")
    run_example("timm", ns)
    gpt2_state = {k: v.clone() for k, v in ns["gpt2"].state_dict().items()}
    vit_state = {k: v.clone() for k, v in ns["vit"].state_dict().items()}
    vit_kinds = {n: type(m) for n, m in ns["vit"].named_modules()}
    run_example("save-and-load", ns)
    gpt2, vit = ns["gpt2"], ns["vit"]
    assert json.loads((in_tmp / "out" / "config.json").read_text())["meprop"] == ns["meprop_settings"](gpt2)
    assert _count(gpt2, MePropConv1D) == 48 and type(gpt2.lm_head) is nn.Linear
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight  # still tied after the load
    for k, v in gpt2.state_dict().items():
        assert torch.equal(v, gpt2_state[k]), k
    assert {n: type(m) for n, m in vit.named_modules()} == vit_kinds
    for k, v in vit.state_dict().items():
        assert torch.equal(v, vit_state[k]), k
