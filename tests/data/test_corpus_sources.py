"""data/corpus.py --source linux-doc: a second C4-format corpus from Debian's kernel docs alone, built offline
from a .deb already in the download folder (here a small fake one with the real package's layout)."""
import gzip
import io
import json
import tarfile

import pytest

from data import corpus as C

PROSE = ("The scheduler decides which task runs next on each processor. It keeps a queue of runnable tasks "
         "and picks the one that has waited longest relative to its weight. ") * 12


def fake_deb(path, files: dict[str, str]) -> None:
    """An `ar` archive holding data.tar.xz with usr/share/doc/linux-doc-6.1/Documentation/<rel>.rst.gz files."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for rel, text in sorted(files.items()):
            body = gzip.compress(text.encode(), mtime=0)
            info = tarfile.TarInfo(f"./usr/share/doc/linux-doc-6.1/Documentation/{rel}.gz")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    data = buf.getvalue()
    def member(name: str, body: bytes) -> bytes:
        head = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
        return head + body + (b"\n" if len(body) % 2 else b"")
    path.write_bytes(b"!<arch>\n" + member("debian-binary", b"2.0\n") + member("data.tar.xz", data))


def test_linux_doc_source_builds_from_the_deb_alone(tmp_path, capsys):
    dl = tmp_path / "dl"
    dl.mkdir()
    files = {f"scheduler/sched-{i}.rst": f"Title {i}\n=======\n\n{PROSE}" for i in range(8)}
    files["translations/it_IT/index.rst"] = "Italiano " * 100   # translations are left out
    fake_deb(dl / "linux-doc-6.1_6.1.0-1_all.deb", files)
    out = tmp_path / "ld"
    assert C.main(["--source", "linux-doc", "--out", str(out), "--download-dir", str(dl),
                   "--train-shards", "2", "--val-shards", "1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["sources"]) == ["linux-doc (linux-doc-6.1_6.1.0-1_all.deb)"]
    assert manifest["sources"]["linux-doc (linux-doc-6.1_6.1.0-1_all.deb)"]["files"] == 8
    records = [json.loads(line) for f in sorted(out.glob("c4-*.json.gz")) for line in gzip.open(f, "rt")]
    assert records and all(r["url"].startswith("deb://linux-doc-6.1/Documentation/scheduler/") for r in records)
    assert not any("Italiano" in r["text"] for r in records)
    assert not any("Shakespeare" in r["text"] for r in records)      # nothing of the default corpus
    again = tmp_path / "again"                                          # deterministic: byte-identical shards
    C.ensure_corpus(again, 2, 1, download_dir=dl, source="linux-doc")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in again.iterdir()}


def test_unknown_source_and_missing_deb_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(C.CorpusError, match="unknown corpus source 'nope'; choose one of default, linux-doc"):
        C.ensure_corpus(tmp_path / "x", source="nope")
    monkeypatch.setenv("PATH", str(tmp_path))   # no apt-get: the linux-doc source cannot be fetched
    with pytest.raises(C.CorpusError, match=r"^apt-get download linux-doc-6.1 failed") as err:
        C.ensure_corpus(tmp_path / "y", download_dir=tmp_path / "dl", source="linux-doc")
    assert "\n" not in str(err.value) and not (tmp_path / "y").exists()
