"""Export a fake training checkpoint to a Hugging Face directory; from_pretrained gives our logits."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from model.llama import Llama, LlamaArgs  # noqa: E402
from tools.export_hf import ExportError, export, main, resolve_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ARGS = LlamaArgs(vocab_size=101, dim=32, n_layers=2, n_heads=4, intermediate_size=48, max_seq_len=24,
                 rope_theta=5000.0)


def tiny_model(seed=0) -> Llama:
    torch.manual_seed(seed)
    m = Llama(ARGS)
    with torch.no_grad():  # make the norms non-trivial so a dropped norm weight would show
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def write_checkpoint(run: Path, step: int, model: Llama, tokenizer: str | None = None, meta=True) -> Path:
    d = run / "checkpoints" / f"step_{step:08d}"
    d.mkdir(parents=True)
    torch.save(model.state_dict(), d / "model.pt")
    if meta:
        config = {"model": {"size": "tiny"}, "data": {"tokenizer": tokenizer or "t5-base"}, "train": {}}
        (d / "meta.json").write_text(json.dumps({"step": step, "model_args": asdict(model.args), "config": config}))
    return d


def ids(b=2, t=ARGS.max_seq_len):
    return torch.randint(0, ARGS.vocab_size, (b, t), generator=torch.Generator().manual_seed(3))


def hf_logits(out_dir: Path, x, dtype=torch.float32):
    hf = transformers.LlamaForCausalLM.from_pretrained(out_dir, dtype=dtype).eval()
    with torch.no_grad():
        return hf(input_ids=x).logits


def test_export_function_roundtrip(tmp_path):
    model = tiny_model()
    tok = tmp_path / "spm.model"
    tok.write_bytes(b"\x0a\x05fake-sentencepiece")
    ck = write_checkpoint(tmp_path / "run", 100, model, tokenizer=str(tok))
    lines = []
    out = export(ck, tmp_path / "hf", log=lines.append)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "tokenizer.model").read_bytes() == tok.read_bytes()
    assert any("SentencePieceProcessor" in s for s in lines)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hidden_size"] == ARGS.dim and cfg["num_hidden_layers"] == ARGS.n_layers
    assert cfg["tie_word_embeddings"] is False
    x = ids()
    with torch.no_grad():
        ours, _ = model(x)
    torch.testing.assert_close(hf_logits(out, x), ours, atol=1e-5, rtol=1e-5)


def test_export_cli_on_run_dir_picks_newest_complete(tmp_path):
    run = tmp_path / "run"
    write_checkpoint(run, 100, tiny_model(seed=1))
    newest = tiny_model(seed=2)
    write_checkpoint(run, 200, newest)
    write_checkpoint(run, 300, tiny_model(seed=3), meta=False)  # being written: no meta.json yet
    assert resolve_checkpoint(run).name == "step_00000200"
    out = tmp_path / "hf"
    res = subprocess.run([sys.executable, "tools/export_hf.py", str(run), str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "step_00000200" in res.stdout and "from_pretrained" in res.stdout
    x = ids()
    with torch.no_grad():
        ours, _ = newest(x)
    torch.testing.assert_close(hf_logits(out, x), ours, atol=1e-5, rtol=1e-5)
    assert json.loads((out / "export_info.json").read_text())["step"] == 200


def test_export_bfloat16(tmp_path):
    model = tiny_model()
    ck = write_checkpoint(tmp_path / "run", 5, model)
    out = export(ck, tmp_path / "hf", dtype="bfloat16", log=lambda *_: None)
    hf = transformers.LlamaForCausalLM.from_pretrained(out)
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    torch.testing.assert_close(hf.lm_head.weight, model.lm_head.weight.to(torch.bfloat16), atol=0, rtol=0)


def test_truncated_checkpoint_is_a_clear_error(tmp_path, capsys):
    ck = write_checkpoint(tmp_path / "run", 100, tiny_model())
    data = (ck / "model.pt").read_bytes()
    (ck / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match="corrupt or truncated.*pick another step_"):
        export(ck, tmp_path / "hf", log=lambda *_: None)
    assert main([str(ck), str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "corrupt or truncated" in err and str(ck) in err


def test_missing_checkpoint_errors(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        export(tmp_path / "nope", tmp_path / "hf")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(ExportError, match="no checkpoint with a meta.json"):
        export(tmp_path / "empty_run", tmp_path / "hf")
    ck = write_checkpoint(tmp_path / "run", 1, tiny_model(), meta=False)
    with pytest.raises(ExportError, match="no meta.json"):
        export(ck, tmp_path / "hf")


def test_mismatched_model_args_error(tmp_path):
    model = tiny_model()
    ck = write_checkpoint(tmp_path / "run", 1, model)
    meta = json.loads((ck / "meta.json").read_text())
    meta["model_args"]["n_layers"] = 3
    (ck / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="does not match its model_args"):
        export(ck, tmp_path / "hf")
