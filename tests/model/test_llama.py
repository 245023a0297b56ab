"""Our LLaMA against transformers.LlamaForCausalLM: same weights -> same logits, loss and gradients.

Tiny shapes, fp32, CPU. Parameter names are HF's minus the `model.` prefix (lm_head has none).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.llama import Llama, LlamaArgs, available_sizes, build_model, size_table
from tools.export_hf import hf_config

transformers = pytest.importorskip("transformers")

ARGS = LlamaArgs(vocab_size=97, dim=32, n_layers=2, n_heads=4, intermediate_size=56, max_seq_len=16)


def hf_name(name: str) -> str:
    return name if name.startswith("lm_head") else "model." + name


def pair(args: LlamaArgs = ARGS, seed: int = 0, attn: str = "eager"):
    """Our model (random init, then norms perturbed so they matter) and an HF model with the same weights."""
    torch.manual_seed(seed)
    ours = Llama(args).float().eval()
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if n.endswith("layernorm.weight") or n == "norm.weight":
                p.add_(0.1 * torch.randn_like(p))
    hf = transformers.LlamaForCausalLM._from_config(hf_config(args), attn_implementation=attn,
                                                    torch_dtype=torch.float32).eval()
    hf_params = dict(hf.named_parameters())
    ours_names = {hf_name(n) for n, _ in ours.named_parameters()}
    assert ours_names == set(hf_params), (ours_names ^ set(hf_params))
    with torch.no_grad():
        for n, p in ours.named_parameters():
            q = hf_params[hf_name(n)]
            assert q.shape == p.shape, n
            q.copy_(p)
    return ours, hf


def rand_ids(b=2, t=ARGS.max_seq_len, vocab=ARGS.vocab_size, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=g)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_match_hf(attn):
    ours, hf = pair(attn=attn)
    ids = rand_ids()
    with torch.no_grad():
        lo, _ = ours(ids)
        lh = hf(input_ids=ids).logits
    assert lo.shape == lh.shape == (2, ARGS.max_seq_len, ARGS.vocab_size)
    torch.testing.assert_close(lo, lh, atol=1e-5, rtol=1e-5)


def test_logits_match_hf_shorter_sequence():
    ours, hf = pair()
    ids = rand_ids(t=5)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], hf(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_loss_and_gradients_match_hf():
    ours, hf = pair()
    ours.train(), hf.train()
    ids = rand_ids(t=ARGS.max_seq_len)
    # HF shifts labels internally: with labels=ids, logits[:, :-1] are scored against ids[:, 1:] and the
    # last position is dropped. Ours takes explicit targets: input ids[:, :-1], targets ids[:, 1:]. By
    # causality HF's logits on positions < T-1 equal ours on the T-1 long input, so the two losses (and
    # their gradients -- HF's last position does not enter its loss) are the same quantity.
    inp, tgt = ids[:, :-1], ids[:, 1:]
    _, loss_o = ours(inp, tgt)
    out_h = hf(input_ids=ids, labels=ids)
    torch.testing.assert_close(loss_o, out_h.loss, atol=1e-6, rtol=1e-6)
    # Our explicit cross-entropy agrees with its own logits too.
    lo, _ = ours(inp)
    torch.testing.assert_close(F.cross_entropy(lo.reshape(-1, lo.size(-1)), tgt.reshape(-1)), loss_o)

    loss_o.backward()
    out_h.loss.backward()
    hf_params = dict(hf.named_parameters())
    for n, p in ours.named_parameters():
        g_h = hf_params[hf_name(n)].grad
        assert p.grad is not None and g_h is not None, n
        torch.testing.assert_close(p.grad, g_h, atol=1e-6, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


def test_loss_equals_hf_with_same_input_and_shifted_labels():
    """Same input for both: HF's labels= loss equals cross-entropy of our logits shifted by hand."""
    ours, hf = pair()
    ids = rand_ids()
    with torch.no_grad():
        lo, _ = ours(ids)
        manual = F.cross_entropy(lo[:, :-1].reshape(-1, lo.size(-1)), ids[:, 1:].reshape(-1))
        torch.testing.assert_close(manual, hf(input_ids=ids, labels=ids).loss, atol=1e-6, rtol=1e-6)


def test_causal_masking():
    torch.manual_seed(0)
    model = Llama(ARGS).eval()
    ids = rand_ids(b=1)
    t = 7
    changed = ids.clone()
    changed[0, t:] = (changed[0, t:] + 1) % ARGS.vocab_size
    with torch.no_grad():
        a, _ = model(ids)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=0, rtol=0)
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_no_biases_and_untied_embeddings():
    model = Llama(ARGS)
    names = [n for n, _ in model.named_parameters()]
    assert not any("bias" in n for n in names), names
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            assert m.bias is None
    assert model.lm_head.weight.data_ptr() != model.embed_tokens.weight.data_ptr()
    assert model.lm_head.weight is not model.embed_tokens.weight
    # 2 matrices of vocab x dim + per layer 4 dim^2 + 3 dim x inter + 2 norms, + final norm
    a = ARGS
    expected = 2 * a.vocab_size * a.dim + a.n_layers * (4 * a.dim ** 2 + 3 * a.dim * a.intermediate_size
                                                        + 2 * a.dim) + a.dim
    assert model.num_params() == expected


def test_state_dict_has_no_buffers_and_hf_names():
    sd = Llama(ARGS).state_dict()
    assert "rope_cos" not in sd and "rope_sin" not in sd
    assert "layers.0.self_attn.q_proj.weight" in sd and "lm_head.weight" in sd and "norm.weight" in sd


def test_sequence_longer_than_max_seq_len_raises():
    model = Llama(ARGS)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(rand_ids(b=1, t=ARGS.max_seq_len + 1))


def test_targets_shape_and_ignore_index():
    torch.manual_seed(0)
    model = Llama(ARGS).eval()
    ids = rand_ids(b=2, t=8)
    tgt = ids.roll(-1, dims=1)
    tgt[:, -1] = -100
    with torch.no_grad():
        logits, loss = model(ids, tgt)
        ref = F.cross_entropy(logits[:, :-1].reshape(-1, ARGS.vocab_size), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ref)


def test_sizes_and_build_model():
    assert set(available_sizes()) >= {"tiny", "60m", "130m", "350m", "1b", "7b"}
    assert size_table("60M") == size_table("llama_60m")
    with pytest.raises(ValueError, match="unknown model size"):
        size_table("3b")
    m = build_model("tiny", vocab_size=101, max_seq_len=8, n_layers=1)
    assert m.args.n_layers == 1 and m.args.dim == size_table("tiny")["dim"]


def test_odd_head_dim_rejected():
    with pytest.raises(ValueError, match="heads"):
        Llama(LlamaArgs(vocab_size=10, dim=30, n_layers=1, n_heads=4, intermediate_size=8))
