"""configs/models/llama_cpu.toml, the convergence study's model: at the local 8k vocabulary most of its weights are
projectable (GaLore's rule: the 2-D attention/MLP weights), unlike tiny, so a comparison measures projection."""
import torch

from model.llama import Llama, LlamaArgs, size_table
from optim.adam import is_projected


def projectable_fraction(size: str, vocab: int = 8192) -> float:
    with torch.device("meta"):
        m = Llama(LlamaArgs(vocab_size=vocab, max_seq_len=256, **size_table(size)))
    named = list(m.named_parameters())
    total = sum(p.numel() for _, p in named)
    return sum(p.numel() for n, p in named if is_projected(n, p.shape)) / total


def test_cpu_size_is_projection_heavy():
    frac = projectable_fraction("cpu")
    assert frac >= 0.7, frac
    assert abs(frac - 0.7239) < 1e-3          # the fraction docs/results.md and the size file state
    assert projectable_fraction("tiny") < 0.5  # why tiny alone mostly measured the embeddings
