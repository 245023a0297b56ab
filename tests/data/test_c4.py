"""data/c4.py on the local corpus: a step's sequences do not depend on the world size, the packing (targets are
the inputs shifted by one, consecutive sequences of a stream share their boundary token, no token is lost), and
an exact restore, also onto another world size and across the wrap to a new pass over the files."""
from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pytest
import torch

import data.c4 as c4
from data.c4 import TrainBatches
from data.tokenizer import load_tokenizer

STREAMS, GLOBAL_BATCH, ACCUM, SEQ = 4, 8, 2, 128


@pytest.fixture(scope="module")
def tok(spm_path):
    return load_tokenizer(spm_path)


@pytest.fixture
def one_doc_per_refill(monkeypatch):
    """A refill tokenizes one document instead of 64 (~26k tokens here): a few steps then cross many refills,
    so a restore lands between documents and the stream's `datasets` position has to be right, not only
    the buffered tokens."""
    monkeypatch.setattr(c4, "TOKENIZE_DOCS", 1)


def ranks(path, tok, world: int, streams: int = STREAMS) -> list[TrainBatches]:
    """Every rank's TrainBatches of a `world`-rank run with the same global batch (micro-batch x ACCUM x world)."""
    return [TrainBatches(str(path), tok, SEQ, streams, GLOBAL_BATCH // world // ACCUM, ACCUM, rank=r, world_size=world)
            for r in range(world)]


def take(batches: list[TrainBatches], steps: int, first: int = 0) -> dict:
    """{(global step, stream): the (per_stream, SEQ + 1) sequences that stream gives to that step}, from every
    rank. A rank's step is its streams' sequences in stream order, split into micro-batches (data/c4.py)."""
    return take_steps(batches, steps, first)[0]


def take_steps(batches: list[TrainBatches], steps: int, first: int = 0) -> tuple[dict, dict]:
    """(`take`'s dict, {global step: every rank's sequences of that step, gathered in rank order})."""
    by_stream, by_step = {}, {}
    for t in range(first, first + steps):
        gathered = []
        for b in batches:
            micro = b.next_step()
            assert len(micro) == ACCUM and all(x.shape == y.shape == (b.micro_batch, SEQ) for x, y in micro)
            seqs = torch.cat([torch.cat([x, y[:, -1:]], dim=1) for x, y in micro])  # inputs + the last target
            gathered.append(seqs)
            for i, s in enumerate(b.stream_ids):
                by_stream[(t, s)] = seqs[i * b.per_stream:(i + 1) * b.per_stream]
        by_step[t] = torch.cat(gathered)
    return by_stream, by_step


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"step {key[0]}, stream {key[1]} differs"


def restored(states: dict, path, tok, world: int, streams: int = STREAMS) -> list[TrainBatches]:
    """Fresh TrainBatches of a `world`-rank run loading the saved states, after a round trip through torch.save
    and torch.load(weights_only=True), as a checkpoint stores them (checkpoint.py)."""
    buf = io.BytesIO()
    torch.save(states, buf)
    buf.seek(0)
    states = torch.load(buf, weights_only=True)
    fresh = ranks(path, tok, world, streams)
    for b in fresh:
        b.load_state_dicts({s: states[s] for s in b.stream_ids})
    return fresh


def states_of(batches: list[TrainBatches]) -> dict:
    return {s: st for b in batches for s, st in b.state_dicts().items()}


# ------------------------------------------------------------------------------------------ world size

def test_a_steps_sequences_do_not_depend_on_the_world_size(corpus_dir, tok, one_doc_per_refill):
    """World sizes 1, 2 and 4 give every global step the same sequences from every stream, in the same order.
    Gathered in rank order (rank r reads streams r, r + W, ...) the global batch is the same set; only the order
    of the streams in it differs, i.e. the order of the gradient sum."""
    steps = 6
    runs = {world: take_steps(ranks(corpus_dir, tok, world), steps) for world in (1, 2, 4)}
    one_streams, one_steps = runs[1]
    assert len(one_streams) == steps * STREAMS
    rows = lambda batch: sorted(map(tuple, batch.tolist()))  # noqa: E731
    for world in (2, 4):
        by_stream, by_step = runs[world]
        assert_same(by_stream, one_streams)
        for t in range(steps):
            assert by_step[t].shape == (GLOBAL_BATCH, SEQ + 1) and rows(by_step[t]) == rows(one_steps[t])
    assert not torch.equal(runs[2][1][0], one_steps[0])     # the gathered order does differ: streams 0, 2, 1, 3


# ------------------------------------------------------------------------------------------ packing

def test_packing_shifts_targets_and_shares_boundary_tokens(corpus_dir, tok):
    """inputs = seq[:-1], targets = seq[1:]; the next sequence of a stream starts with the last token of the one
    before (so no transition between two sequences is lost), and gluing the sequences at those shared tokens
    gives exactly the stream's documents, tokenized and each followed by EOS, in file order."""
    b = TrainBatches(str(corpus_dir), tok, SEQ, STREAMS, GLOBAL_BATCH // ACCUM, ACCUM)
    for x, y in b.next_step():
        assert torch.equal(x[:, 1:], y[:, :-1])
    b = TrainBatches(str(corpus_dir), tok, SEQ, STREAMS, GLOBAL_BATCH // ACCUM, ACCUM)
    steps = 12
    got = take([b], steps)
    stream0 = [seq for t in range(steps) for seq in got[(t, 0)]]
    for before, after in zip(stream0, stream0[1:]):
        assert before[-1] == after[0]
    glued = torch.cat([stream0[0]] + [seq[1:] for seq in stream0[1:]]).tolist()
    # stream 0 reads train files 0, S, 2S, ...: the first of them holds far more than these tokens
    first_file = sorted(Path(corpus_dir).glob("*train*.json.gz"))[0]
    expected = []
    with gzip.open(first_file, "rt", encoding="utf-8") as fh:
        for line in fh:
            expected += tok.encode_batch([json.loads(line)["text"]])[0] + [tok.eos_id]
            if len(expected) >= len(glued):
                break
    assert len(glued) == steps * GLOBAL_BATCH // STREAMS * SEQ + 1
    assert glued == expected[:len(glued)]
    assert tok.eos_id in glued                              # the test spans a document boundary


# ------------------------------------------------------------------------------------------ restore

@pytest.mark.parametrize("world_before,world_after", [(1, 1), (2, 2), (1, 2), (2, 1), (4, 2), (1, 4)])
def test_restore_gives_the_batches_an_uninterrupted_run_gives(corpus_dir, tok, one_doc_per_refill,
                                                              world_before, world_after):
    """State at step k, fresh TrainBatches (on the same or another world size) load it: the next N global steps
    equal those of the uninterrupted run."""
    k, n = 5, 6
    uninterrupted = take(ranks(corpus_dir, tok, world_before), k + n)
    before = ranks(corpus_dir, tok, world_before)
    take(before, k)
    after = take(restored(states_of(before), corpus_dir, tok, world_after), n, first=k)
    assert_same(after, {key: v for key, v in uninterrupted.items() if key[0] >= k})


@pytest.fixture(scope="module")
def small_corpus(corpus_dir, tmp_path_factory) -> Path:
    """4 train shards of 2 documents each (~800 tokens); with 2 streams a stream reads 2 shards (~1600 tokens)
    and wraps every ~3 steps of 4 x 128 tokens."""
    out = tmp_path_factory.mktemp("small_corpus")
    with gzip.open(sorted(Path(corpus_dir).glob("*train*.json.gz"))[0], "rt", encoding="utf-8") as fh:
        docs = [next(fh) for _ in range(8)]
    for i in range(4):
        with gzip.open(out / f"c4-train.{i:05d}-of-00004.json.gz", "wt", encoding="utf-8") as fh:
            fh.writelines(docs[2 * i:2 * i + 2])
    return out


@pytest.mark.parametrize("k", [1, 5])
def test_restore_across_the_wrap_to_a_new_pass(small_corpus, tok, one_doc_per_refill, k):
    """A stream that has read all its files starts a new pass over them (epoch + 1); a state saved before
    (k=1) or after (k=5) that wrap restores exactly, also on another world size."""
    streams, n = 2, 8
    uninterrupted = ranks(small_corpus, tok, 1, streams)
    expected = take(uninterrupted, k + n)
    assert all(s.epoch >= 1 for s in uninterrupted[0].streams.values())   # the run did wrap
    before = ranks(small_corpus, tok, 1, streams)
    take(before, k)
    epochs = {s.epoch for s in before[0].streams.values()}
    assert (epochs == {0}) if k == 1 else (min(epochs) >= 1)
    after = take(restored(states_of(before), small_corpus, tok, 2, streams), n, first=k)
    assert_same(after, {key: v for key, v in expected.items() if key[0] >= k})
