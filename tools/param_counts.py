"""Parameter counts of the model sizes: ours next to transformers.LlamaForCausalLM for the same config.

    python tools/param_counts.py [--vocab 32000] [--tiny-vocab 8192] [--json]

Both models are built on the meta device, so even 7B allocates nothing. "non-embedding" excludes the
input embedding and the (untied) lm_head, the two vocab x dim matrices.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from model.llama import Llama, LlamaArgs, size_table  # noqa: E402
from tools.export_hf import hf_config  # noqa: E402

SIZES = ["tiny", "60m", "130m", "350m", "1b", "7b"]


def llama_args(size: str, vocab_size: int, max_seq_len: int = 256) -> LlamaArgs:
    return LlamaArgs(vocab_size=vocab_size, max_seq_len=max_seq_len, **size_table(size))


def count_ours(args: LlamaArgs) -> tuple[int, int]:
    """(total, non-embedding) parameters of our Llama, built on the meta device."""
    with torch.device("meta"):
        m = Llama(args)
    total = sum(p.numel() for p in m.parameters())
    emb = m.embed_tokens.weight.numel() + m.lm_head.weight.numel()
    return total, total - emb


def count_hf(args: LlamaArgs) -> tuple[int, int]:
    """(total, non-embedding) parameters of transformers.LlamaForCausalLM, built on the meta device."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        m = LlamaForCausalLM(hf_config(args))
    # parameters() deduplicates tied weights; ours are untied so both count two vocab x dim matrices.
    total = sum(p.numel() for p in m.parameters())
    emb = m.model.embed_tokens.weight.numel() + m.lm_head.weight.numel()
    return total, total - emb


def rows(vocab: int = 32000, tiny_vocab: int = 8192, sizes=SIZES) -> list[dict]:
    out = []
    for size in sizes:
        v = tiny_vocab if size == "tiny" else vocab
        args = llama_args(size, v)
        (ours, ours_ne), (hf, hf_ne) = count_ours(args), count_hf(args)
        out.append({"size": size, "vocab": v, "dim": args.dim, "intermediate": args.intermediate_size,
                    "heads": args.n_heads, "layers": args.n_layers, "ours": ours, "hf": hf,
                    "ours_non_embedding": ours_ne, "hf_non_embedding": hf_ne, "match": ours == hf and ours_ne == hf_ne})
    return out


def human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def markdown(table: list[dict]) -> str:
    lines = ["| size | vocab | hidden | inter | heads | layers | ours | LlamaForCausalLM | non-embedding (ours / HF) | match |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['size']} | {r['vocab']} | {r['dim']} | {r['intermediate']} | {r['heads']} | {r['layers']} "
                     f"| {r['ours']:,} ({human(r['ours'])}) | {r['hf']:,} ({human(r['hf'])}) "
                     f"| {r['ours_non_embedding']:,} / {r['hf_non_embedding']:,} ({human(r['ours_non_embedding'])}) "
                     f"| {'yes' if r['match'] else '**NO**'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary of the named sizes (GaLore: 32000, T5)")
    ap.add_argument("--tiny-vocab", type=int, default=8192, help="vocabulary of the tiny size")
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--json", action="store_true", help="JSON lines instead of a Markdown table")
    a = ap.parse_args(argv)
    table = rows(a.vocab, a.tiny_vocab, [s.strip() for s in a.sizes.split(",") if s.strip()])
    if a.json:
        for r in table:
            print(json.dumps(r))
    else:
        print(markdown(table))
    return 0 if all(r["match"] for r in table) else 1


if __name__ == "__main__":
    sys.exit(main())
