"""Export a training checkpoint to a Hugging Face `LlamaForCausalLM` directory.

    python tools/export_hf.py runs/tiny_rgp/checkpoints/step_00000200 out/tiny_rgp_hf [--dtype bfloat16]
    python tools/export_hf.py runs/tiny_rgp out/tiny_rgp_hf      # a run dir: its newest complete step_*

CHECKPOINT is a directory holding `model.pt` (the model's state_dict) and `meta.json`
(`{"step", "model_args": asdict(LlamaArgs), "config": {...}}`). The output is `config.json` +
`model.safetensors` (via `save_pretrained`), loadable with `LlamaForCausalLM.from_pretrained(OUT_DIR)`
and giving the same logits as our model (the parameter names are HF's minus `model.`; RoPE layouts agree).
A SentencePiece tokenizer named in the run config (`config["data"]["tokenizer"]`, a `.model` file)
is copied to `OUT_DIR/tokenizer.model`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import MISSING, fields
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import checkpoint_files  # noqa: E402
from checkpoint import resolve_resume  # noqa: E402
from model.llama import Llama, LlamaArgs  # noqa: E402


class ExportError(RuntimeError):
    """A one-line, user-facing reason the export cannot proceed."""


def hf_config(args: LlamaArgs, dtype: torch.dtype | None = None):
    """The `transformers.LlamaConfig` equivalent to our LlamaArgs (MHA, no biases, untied, SiLU)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.intermediate_size,
        num_attention_heads=args.n_heads,
        num_hidden_layers=args.n_layers,
        num_key_value_heads=args.n_heads,
        rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta,
        max_position_embeddings=args.max_seq_len,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
    )
    if dtype is not None:
        cfg.dtype = dtype
    return cfg


def to_hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else "model." + name


def to_hf_state_dict(state_dict: dict) -> dict:
    return {to_hf_name(k): v for k, v in state_dict.items()}


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir as given, or the newest complete checkpoint of a run dir (or of its checkpoints/ dir),
    found as `--train.resume=auto` finds it (checkpoint.resolve_resume)."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"checkpoint {path} does not exist")
    if path.is_file():
        if path.name in (checkpoint_files.MODEL, checkpoint_files.META):
            path = path.parent
        else:
            raise ExportError(f"{path} is a file; pass a checkpoint directory (step_*) or a run directory")
    if (path / checkpoint_files.META).is_file() or (path / checkpoint_files.MODEL).is_file():
        return path   # a checkpoint directory (load_checkpoint names what it lacks)
    run = path.parent if path.name == checkpoint_files.CHECKPOINTS else path
    newest = resolve_resume("auto", run)
    if newest is None:
        raise ExportError(f"no checkpoint with a {checkpoint_files.META} found in {path} "
                          f"(looked for {checkpoint_files.CHECKPOINTS}/step_*)")
    return newest


def load_checkpoint(ckpt: Path) -> tuple[dict, dict]:
    """(meta, state_dict) of a checkpoint dir, with one-line errors for missing or damaged files."""
    meta_path, model_path = ckpt / checkpoint_files.META, ckpt / checkpoint_files.MODEL
    if not meta_path.is_file():
        raise ExportError(f"checkpoint {ckpt} has no {meta_path.name} (incomplete save?); pick another step_* directory")
    if not model_path.is_file():
        raise ExportError(f"checkpoint {ckpt} has no {model_path.name}; pick another step_* directory")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"checkpoint {ckpt} has a corrupt {meta_path.name} ({e}); pick another step_* directory") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model_args"), dict):
        raise ExportError(f"checkpoint {ckpt}: {meta_path.name} lacks a 'model_args' object; "
                          f"pick another step_* directory")
    try:
        sd = torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip/pickle errors differ by torch version; all mean the same thing here
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"checkpoint {ckpt} is corrupt or truncated ({type(e).__name__}: {reason}); "
                          f"pick another step_* directory") from None
    if not isinstance(sd, dict):
        raise ExportError(f"checkpoint {ckpt}: {model_path.name} holds a {type(sd).__name__}, not a state_dict")
    # A state_dict saved from a wrapped model (DDP/compile) carries a prefix; drop it.
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return meta, sd


def llama_args_from_meta(meta: dict) -> LlamaArgs:
    known = {f.name for f in fields(LlamaArgs)}
    margs = meta["model_args"]
    missing = {f.name for f in fields(LlamaArgs) if f.name not in margs and f.default is MISSING}
    if missing:
        raise ExportError(f"{checkpoint_files.META} model_args lacks {sorted(missing)}")
    return LlamaArgs(**{k: v for k, v in margs.items() if k in known})


def _tokenizer_path(meta: dict) -> str | None:
    cfg = meta.get("config") or {}
    data = cfg.get("data") if isinstance(cfg, dict) else None
    tok = data.get("tokenizer") if isinstance(data, dict) else None
    return tok if isinstance(tok, str) and tok else None


def export(checkpoint: str | Path, out_dir: str | Path, dtype: str = "float32", log=print) -> Path:
    """Write a `LlamaForCausalLM` directory for `checkpoint` (a step dir or a run dir). Returns OUT_DIR."""
    from transformers import LlamaForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ExportError(f"unsupported dtype {dtype!r}; choose float32 or bfloat16")
    ckpt = resolve_checkpoint(checkpoint)
    meta, sd = load_checkpoint(ckpt)
    args = llama_args_from_meta(meta)

    # Validate against our own model first: the error names our parameters, not HF's.
    with torch.device("meta"):  # names/shapes only, nothing allocated
        ours = Llama(args)
    expected = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or unexpected:
        raise ExportError(f"checkpoint {ckpt} does not match its model_args: missing {missing[:3]}"
                          f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                          f"{'...' if len(unexpected) > 3 else ''}")
    bad = [k for k in expected if expected[k] != got[k]]
    if bad:
        raise ExportError(f"checkpoint {ckpt}: shape of {bad[0]} is {got[bad[0]]}, model_args say {expected[bad[0]]}")

    config = hf_config(args, torch_dtype)
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    hf_sd = {k: v.to(torch_dtype) for k, v in to_hf_state_dict(sd).items()}
    result = hf.load_state_dict(hf_sd, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    # Non-persistent buffers (rotary inv_freq) are still on meta: recompute them on CPU.
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=config)
    hf = hf.to(torch_dtype).eval()
    left = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    assert not left, f"tensors left on the meta device: {left}"

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out_dir, safe_serialization=True)

    info = {"source_checkpoint": str(ckpt.resolve()), "step": meta.get("step"), "dtype": dtype,
            "model_args": meta["model_args"]}
    tok = _tokenizer_path(meta)
    tok_note = None
    if tok is not None:
        tok_path = Path(tok)
        if not tok_path.is_absolute() and not tok_path.exists():
            # relative to the repo (where train.py runs) or the run directory
            for base in (REPO, ckpt.parent.parent, ckpt.parent):
                if (base / tok).exists():
                    tok_path = base / tok
                    break
        if tok_path.suffix == ".model" and tok_path.is_file():
            shutil.copyfile(tok_path, out_dir / "tokenizer.model")
            info["tokenizer"] = "tokenizer.model (SentencePiece)"
            tok_note = (f"tokenizer: copied {tok_path.resolve()} -> {out_dir / 'tokenizer.model'}; load it with "
                        f"sentencepiece.SentencePieceProcessor(model_file='{out_dir / 'tokenizer.model'}') "
                        f"(not AutoTokenizer: a folder with only tokenizer.model encodes wrongly)")
        elif tok_path.suffix == ".model":
            tok_note = f"tokenizer: {tok} not found, not copied"
        else:
            info["tokenizer"] = tok
            tok_note = f"tokenizer: the run used {tok!r} (a transformers name/dir); load it with AutoTokenizer"
    (out_dir / "export_info.json").write_text(json.dumps(info, indent=2) + "\n")

    n = sum(v.numel() for v in sd.values())
    log(f"exported {ckpt} (step {meta.get('step')}, {n:,} params, {dtype}) -> {out_dir}")
    log(f"load with: transformers.LlamaForCausalLM.from_pretrained('{out_dir}')")
    if tok_note:
        log(tok_note)
    return out_dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a step_* checkpoint dir, or a run dir (its newest complete checkpoint)")
    ap.add_argument("out_dir")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = ap.parse_args(argv)
    try:
        export(a.checkpoint, a.out_dir, a.dtype)
    except ExportError as e:
        print(f"export_hf: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
