"""Perplexity of the unigram baseline on a run's validation tokens: the floor any language model must beat.

    python tools/unigram_baseline.py --config configs/runs/tiny_cpu.toml [--max-train-tokens 5000000]

Token frequencies are counted on the train shards (add-one smoothing over the vocabulary) and scored on the
exact validation targets train.py evaluates (data.c4.validation_set), so the number is comparable with a
run's eval_ppl.
"""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from config import parse_args  # noqa: E402
from data.c4 import PackedStream, list_shards, validation_set  # noqa: E402
from data.tokenizer import load_tokenizer  # noqa: E402


def unigram_ppl(train_tokens: torch.Tensor, val_targets: torch.Tensor, vocab_size: int) -> float:
    counts = torch.bincount(train_tokens, minlength=vocab_size).double() + 1.0  # add-one smoothing
    logp = counts.log() - counts.sum().log()
    return math.exp(-logp[val_targets].mean().item())


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    max_tokens = 5_000_000
    if "--max-train-tokens" in argv:
        i = argv.index("--max-train-tokens")
        max_tokens = int(argv[i + 1])
        del argv[i:i + 2]
    cfg = parse_args(argv)
    tok = load_tokenizer(cfg.data.tokenizer)
    stream = PackedStream(list_shards(cfg.data.path, "train"), tok, 4096)
    chunks, n = [], 0
    while n < max_tokens and stream.epoch == 0:
        chunks.append(stream.next_sequence()[:-1])
        n += chunks[-1].numel()
    val = validation_set(cfg.data.path, tok, cfg.data.seq_len, cfg.data.val_tokens)
    ppl = unigram_ppl(torch.cat(chunks), val[:, 1:].reshape(-1), tok.vocab_size)
    print(f"unigram baseline: eval_ppl {ppl:.1f} on {val[:, 1:].numel()} validation tokens "
          f"(frequencies from {n} train tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
