"""LLaMA as in the GaLore paper: RMSNorm, rotary embeddings, SwiGLU MLP, no biases, untied embeddings.

Parameter names follow `transformers.LlamaForCausalLM` without its `model.` prefix (embed_tokens,
layers.N.self_attn.q_proj, ..., norm, lm_head), and RoPE uses the same rotate-half layout, so export to
Hugging Face is a pure rename. The model knows nothing of parallelism or precision policy.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

SIZES_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"


@dataclass
class LlamaArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    intermediate_size: int
    max_seq_len: int = 256
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0


def available_sizes() -> list[str]:
    return sorted(p.stem.removeprefix("llama_") for p in SIZES_DIR.glob("llama_*.toml"))


def size_table(size: str) -> dict:
    """The shape of a named size from configs/models/llama_<size>.toml ('60m', 'llama_60m', '60M' all work)."""
    name = size.lower().removeprefix("llama_")
    path = SIZES_DIR / f"llama_{name}.toml"
    if not path.is_file():
        raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(available_sizes())}")
    return tomllib.loads(path.read_text())


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 whatever the activation dtype, as LLaMA does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device=None):
    """(seq_len, head_dim) cos and sin tables in fp32, rotate-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    freqs = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)                                       # (T, hd)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    # x: (B, H, T, hd); cos/sin: (T, hd)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.head_dim = args.dim // args.n_heads
        self.q_proj = nn.Linear(args.dim, args.dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.dim, bias=False)
        self.o_proj = nn.Linear(args.dim, args.dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        if args.dim % args.n_heads or (args.dim // args.n_heads) % 2:
            raise ValueError(f"dim {args.dim} must split into {args.n_heads} heads of even size")
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        cos, sin = rope_cos_sin(args.max_seq_len, args.dim // args.n_heads, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        # LLaMA/HF initialisation: N(0, 0.02) for every matrix, ones for the norms.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        """idx, targets: (B, T) int64. Returns logits (B, T, V) and the mean next-token loss (or None)."""
        T = idx.shape[1]
        if T > self.args.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.args.max_seq_len}")
        x = self.embed_tokens(idx)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        for block in self.layers:
            x = block(x, cos, sin)
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(size: str, vocab_size: int, max_seq_len: int, **overrides) -> Llama:
    """Build a named size; `overrides` (dim, n_layers, n_heads, intermediate_size, norm_eps, rope_theta)
    replace table values when truthy."""
    shape = size_table(size)
    shape.update({k: v for k, v in overrides.items() if v})
    return Llama(LlamaArgs(vocab_size=vocab_size, max_seq_len=max_seq_len, **shape))

