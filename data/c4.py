"""C4 streaming: shard listing, world-size-independent streams, tokenize + pack, exact resume, validation set.

The run defines `num_streams` fixed data streams over the sorted train shards (stream s reads files
s, s+S, s+2S, ...). Global step t takes B/S consecutive sequences from every stream (B = global batch
in sequences), so the sequences of a step depend on the run alone, never on the world size. Rank r of W
reads the streams s with s % W == r; W must divide S, and S must divide B. The position of every stream
(the `datasets` iterator state + the not-yet-emitted tokens) is checkpointed per stream, so a resumed run,
on any world size that divides S, continues on exactly the next tokens.

Documents are tokenized, joined with EOS and packed into sequences of seq_len + 1 tokens that overlap by
one token (inputs = seq[:-1], targets = seq[1:]), so no token is padding and no transition is lost.

The same code reads a local directory of C4-format shards or the hub's allenai/c4 (`hf://datasets/...`).
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

import torch

HUB_C4 = "hf://datasets/allenai/c4/en"
HUB_NAMES = ("allenai/c4", "hf://datasets/allenai/c4", HUB_C4)
TOKENIZE_DOCS = 64  # documents tokenized per call: large enough for the tokenizer's batching, small enough to resume cheaply


class DataError(ValueError):
    """Bad data input; the message is one line that names the fix."""


def is_hub(path: str) -> bool:
    return path.rstrip("/") in HUB_NAMES


def list_shards(path: str, split: str) -> list[str]:
    """Sorted shard files of a split ('train' or 'validation') in a local dir or on the hub."""
    if is_hub(path):
        count = {"train": 1024, "validation": 8}[split]
        return [f"{HUB_C4}/c4-{split}.{i:05d}-of-{count:05d}.json.gz" for i in range(count)]
    if not os.path.isdir(path):
        raise DataError(f"data.path {path!r} is not a directory; build a local corpus with "
                        f"`python data/corpus.py --out {path}` or pass --data.path=allenai/c4")
    files = sorted(glob.glob(os.path.join(path, f"*{split}*.json.gz")))
    if not files:
        raise DataError(f"no *{split}*.json.gz shards in {path!r}; build them with "
                        f"`python data/corpus.py --out {path}` or point --data.path at C4-format shards")
    for f in files:
        if os.path.getsize(f) == 0:
            raise DataError(f"shard {f!r} is empty; delete it and rebuild the corpus (python data/corpus.py)")
    return files


def stream_files(files: list[str], num_streams: int) -> list[list[str]]:
    if len(files) < num_streams:
        raise DataError(f"data.num_streams={num_streams} but only {len(files)} train shards; "
                        f"set --data.num_streams to at most {len(files)}")
    return [files[s::num_streams] for s in range(num_streams)]


def check_layout(num_streams: int, world_size: int, global_batch: int) -> None:
    """The conditions that make a step's sequences independent of the world size."""
    if num_streams % world_size:
        raise DataError(f"world size {world_size} does not divide data.num_streams={num_streams}; "
                        f"use a world size that divides it or change --data.num_streams")
    if global_batch % num_streams:
        raise DataError(f"global batch {global_batch} sequences (micro_batch x grad_accum x world) is not a "
                        f"multiple of data.num_streams={num_streams}; change train.grad_accum or data.num_streams")


def _open_documents(files: list[str]):
    import datasets
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset("json", data_files=files, streaming=True, split="train")
    except Exception as e:  # the hub while offline, unreadable files: say which and how to fix
        raise DataError(f"cannot open shards {files[0]!r}...: {type(e).__name__}: {str(e).splitlines()[0]}; "
                        f"with no hub access pass --data.path to a local corpus") from None


class PackedStream:
    """One data stream: its files' documents, tokenized, EOS-joined and packed; resumable exactly."""

    def __init__(self, files: list[str], tokenizer, seq_len: int):
        self.files, self.tokenizer, self.seq_len = files, tokenizer, seq_len
        self.epoch = 0
        self.buffer: list[int] = []
        self._dataset = _open_documents(files)
        self._docs = None  # iterator, made lazily so a loaded state applies before reading starts

    def _refill(self) -> None:
        texts, wraps = [], 0
        while len(texts) < TOKENIZE_DOCS:
            if self._docs is None:
                self._docs = iter(self._dataset)
            try:
                texts.append(next(self._docs)["text"])
            except StopIteration:
                if texts:
                    break
                wraps += 1
                if wraps > 1:  # a whole fresh pass gave nothing
                    raise DataError(f"shards {self.files[0]!r}... hold no documents; rebuild the corpus") from None
                self.epoch += 1  # wrap around: a new pass over the same files, in the same order
                self._dataset, self._docs = _open_documents(self.files), None
            except DataError:
                raise
            except Exception as e:
                raise DataError(f"cannot read a shard of {self.files}: {type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}; check or rebuild that shard") from None
        eos = self.tokenizer.eos_id
        for ids in self.tokenizer.encode_batch(texts):
            self.buffer.extend(ids)
            self.buffer.append(eos)

    def next_sequence(self) -> torch.Tensor:
        """(seq_len + 1,) int64 tokens; consecutive sequences overlap by one token."""
        while len(self.buffer) < self.seq_len + 1:
            self._refill()
        seq = torch.tensor(self.buffer[: self.seq_len + 1], dtype=torch.int64)
        del self.buffer[: self.seq_len]
        return seq

    def state_dict(self) -> dict:
        return {"files": list(self.files), "epoch": self.epoch, "dataset": self._dataset.state_dict(),
                "buffer": torch.tensor(self.buffer, dtype=torch.int32)}

    def load_state_dict(self, state: dict) -> None:
        if list(state["files"]) != list(self.files):
            raise DataError(f"checkpoint data stream reads {state['files'][:2]}... but this run's stream reads "
                            f"{self.files[:2]}...; resume with the same --data.path and --data.num_streams")
        self.epoch = state["epoch"]
        self._dataset = _open_documents(self.files)
        self._dataset.load_state_dict(state["dataset"])
        self._docs = None
        self.buffer = state["buffer"].tolist()


class TrainBatches:
    """This rank's share of every global step: `next_step()` -> micro-batches of (inputs, targets)."""

    def __init__(self, path: str, tokenizer, seq_len: int, num_streams: int, micro_batch: int,
                 grad_accum: int, rank: int = 0, world_size: int = 1):
        global_batch = micro_batch * grad_accum * world_size
        check_layout(num_streams, world_size, global_batch)
        all_streams = stream_files(list_shards(path, "train"), num_streams)
        self.stream_ids = [s for s in range(num_streams) if s % world_size == rank]
        self.streams = {s: PackedStream(all_streams[s], tokenizer, seq_len) for s in self.stream_ids}
        self.per_stream = global_batch // num_streams  # sequences each stream gives to every step
        self.micro_batch, self.grad_accum = micro_batch, grad_accum

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        seqs = [self.streams[s].next_sequence() for s in self.stream_ids for _ in range(self.per_stream)]
        batch = torch.stack(seqs)  # (micro_batch * grad_accum, seq_len + 1)
        return [(mb[:, :-1], mb[:, 1:]) for mb in batch.split(self.micro_batch)]

    def state_dicts(self) -> dict[int, dict]:
        return {s: stream.state_dict() for s, stream in self.streams.items()}

    def load_state_dicts(self, states: dict[int, dict]) -> None:
        for s, stream in self.streams.items():
            stream.load_state_dict(states[s])


def validation_set(path: str, tokenizer, seq_len: int, val_tokens: int) -> torch.Tensor:
    """The fixed validation sequences, (N, seq_len + 1): the first ceil(val_tokens / seq_len) packed
    sequences of the validation shards read in order. Identical for every run and world size."""
    n = -(-val_tokens // seq_len)
    stream = PackedStream(list_shards(path, "validation"), tokenizer, seq_len)
    seqs = []
    for _ in range(n):
        seqs.append(stream.next_sequence())
        if stream.epoch > 0:                      # the shards ran out: stop at once (a huge budget would spin)
            if len(seqs) == 1:                    # not even one sequence: the sequence length is too long
                raise DataError(f"the validation shards in {path!r} hold fewer than data.seq_len + 1 = "
                                f"{seq_len + 1} tokens; lower --data.seq_len")
            raise DataError(f"the validation shards in {path!r} hold fewer than {val_tokens} tokens; "
                            f"lower --data.val_tokens")
    return torch.stack(seqs)
