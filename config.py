"""Run configuration: plain dataclasses filled from a TOML recipe plus `--section.key=value` overrides.

Precedence: command line > TOML recipe > dataclass defaults. Every key is validated once, here:
an unknown section/key or a value of the wrong type is a one-line error naming the closest valid key.

    cfg = parse_args(["--config", "configs/runs/tiny_cpu.toml", "--optim.lr=0.01"])
"""
from __future__ import annotations

import dataclasses
import difflib
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A bad config key or value; the message is one line that names the fix."""


@dataclass
class ModelConfig:
    size: str = "tiny"                 # a file configs/models/llama_<size>.toml: tiny, 60m, 130m, 350m, 1b, 7b
    vocab_size: int = 0                # 0: taken from the tokenizer
    dim: int = 0                       # 0: taken from the size file (set any of these to override it)
    n_layers: int = 0                  # transformer blocks (0: from the size file)
    n_heads: int = 0                   # attention heads (0: from the size file)
    intermediate_size: int = 0         # SwiGLU hidden width (0: from the size file)
    norm_eps: float = 1e-6             # RMSNorm epsilon
    rope_theta: float = 10000.0        # RoPE base


@dataclass
class DataConfig:
    path: str = ".cache/corpus"        # local dir of C4-format shards, or "allenai/c4" / "hf://datasets/allenai/c4"
    tokenizer: str = ".cache/tokenizer/spm.model"  # SentencePiece .model file, or a transformers name/dir ("t5-base")
    seq_len: int = 256                 # tokens per training sequence
    num_streams: int = 8               # fixed per run: world sizes must divide it, the global batch must be a multiple
    val_tokens: int = 65536            # fixed validation token budget (GaLore used 10M on C4)
    build_local: bool = False          # build a missing corpus / tokenizer at any path (always done at the defaults)


@dataclass
class OptimConfig:
    name: str = "adamw"                # adamw, adamw8bit, galore, galore8bit, rgp, rgp8bit
    lr: float = 1e-3                   # peak learning rate (> 0), scheduled by train.warmup_frac / min_lr_frac
    matrix_lr: float = 0.0             # peak lr of the projectable 2-D attention/MLP weights, any optimizer (0: lr)
    other_lr: float = 0.0              # peak lr of embeddings, lm_head and norms, any optimizer (0: lr)
    beta1: float = 0.9                 # Adam's first-moment decay
    beta2: float = 0.999               # Adam's second-moment decay
    eps: float = 1e-8                  # Adam's epsilon
    weight_decay: float = 0.0          # decoupled weight decay (the GaLore recipe uses 0)
    rank: int = 128                    # projection rank r (galore/rgp)
    update_proj_gap: int = 200         # refresh the basis every T steps (steps 0, T, 2T, ...)
    scale: float = 0.25                # GaLore's alpha
    proj_type: str = "std"             # std (reduce the smaller dim), left, right
    oversampling: int = 2              # RGP: k = rank + oversampling
    power_iters: int = 0               # RGP: subspace (power) iterations
    moments_on_refresh: str = "keep"   # keep (GaLore) or project (re-express moments in the new basis)
    rank_decay: float = 1.0            # rank-decaying galore/rgp: divide the rank by this at every later refresh (1: off)
    min_rank: int = 4                  # the floor of rank_decay and rank_energy
    rank_energy: float = 0.0           # adaptive rank: smallest r keeping this fraction of the gradient's energy (0: off)
    basis_dtype: str = "float32"       # storage of the projection bases: float32, bfloat16, int8 (fp32 math)
    layerwise: bool = False            # step each parameter in its post-accumulate-grad hook
    comm_dtype: str = "auto"           # gradient communication dtype: auto (the weights'), float32, bfloat16
    lowrank_comm: bool = False         # send projected gradients G @ Q instead of G (galore/rgp, >1 process)
    lowrank_update: bool = False       # with lowrank_comm: send projected matrices' low-rank updates, not weights


@dataclass
class TrainConfig:
    micro_batch: int = 8               # sequences per rank per micro-step
    grad_accum: int = 1                # micro-steps per optimizer step (set by global_batch when that is set)
    global_batch: int = 0              # sequences per optimizer step; when set, grad_accum = global / (micro x world)
    max_steps: int = 200               # optimizer steps (sets the LR schedule)
    stop_at_step: int = 0              # checkpoint and exit after this step (time-sliced jobs); 0 runs to max_steps
    warmup_frac: float = 0.1           # linear warmup over this fraction of max_steps ...
    min_lr_frac: float = 0.1           # ... then cosine down to this fraction of optim.lr
    grad_clip: float = 1.0             # 0 disables clipping
    eval_every: int = 50               # validate every N steps and at the end (0: never)
    save_every: int = 100              # checkpoint every N steps and at the end (0: only at the end)
    keep_last: int = 0                 # keep this many newest checkpoints (0 keeps all)
    out_dir: str = "runs/tiny_cpu"     # the run directory: config.toml, metrics.jsonl, checkpoints/
    resume: str = "none"               # none, auto (newest complete checkpoint in out_dir), or a checkpoint path
    seed: int = 0                      # model initialisation seed
    dtype: str = "auto"                # auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16
    device: str = "auto"               # auto, cpu, cuda
    skip_nonfinite: bool = False       # skip a step whose loss or gradient norm is NaN/inf instead of stopping
    force_collectives: bool = False    # run the sharded optimizer's collectives even with one process (GPU smoke test)


@dataclass
class LogConfig:
    log_every: int = 10                # write a metrics record every N steps
    wandb: bool = False                # also log to wandb (one wandb run per run directory)
    wandb_project: str = "lowrank-pretrain"  # wandb project name
    wandb_mode: str = "offline"        # offline works with no network; online needs WANDB_API_KEY
    progress: bool = True              # tqdm bar when stdout is a terminal


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    deepspeed: str = ""                # path to a DeepSpeed JSON config (launch with deepspeed/torchrun)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _closest(word: str, options) -> str:
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.0)
    return match[0] if match else "?"


def _coerce(value: Any, typ: type, where: str) -> Any:
    """Convert a TOML value or a command-line string to the field's type, or fail naming the key."""
    if isinstance(value, str) and typ is not str:
        text = value.strip().lower()
        if typ is bool:
            if text in ("true", "1", "yes"):
                return True
            if text in ("false", "0", "no"):
                return False
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        try:
            return typ(text)
        except ValueError:
            raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}") from None
    if typ is float and type(value) is int:
        return float(value)
    if type(value) is not typ:
        raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}")
    return value


def _set(cfg: Config, dotted: str, value: Any) -> None:
    sections = {f.name: f for f in dataclasses.fields(Config) if f.name != "deepspeed"}
    if "." not in dotted:
        if dotted != "deepspeed":
            valid = [f"{s}.{k.name}" for s in sections for k in dataclasses.fields(getattr(cfg, s))]
            raise ConfigError(f"unknown config key {dotted!r}; did you mean {_closest(dotted, valid + ['deepspeed'])!r}?")
        cfg.deepspeed = _coerce(value, str, dotted)
        return
    section, key = dotted.split(".", 1)
    if section not in sections:
        raise ConfigError(f"unknown config section {section!r} in {dotted!r}; did you mean {_closest(section, sections)!r}?")
    sub = getattr(cfg, section)
    fields = {f.name: f for f in dataclasses.fields(sub)}
    if key not in fields:
        raise ConfigError(f"unknown config key {dotted!r}; did you mean "
                          f"'{section}.{_closest(key, fields)}'?")
    typ = {"str": str, "int": int, "float": float, "bool": bool}[str(fields[key].type)]
    setattr(sub, key, _coerce(value, typ, dotted))


def load_toml(cfg: Config, path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found; pass an existing recipe, e.g. configs/runs/tiny_cpu.toml")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    _apply(cfg, data)


def _apply(cfg: Config, data: dict[str, Any]) -> None:
    """Set every key of a {section: {key: value}} mapping (a TOML recipe or `to_dict()` output)."""
    for name, body in data.items():
        if isinstance(body, dict):
            for key, value in body.items():
                _set(cfg, f"{name}.{key}", value)
        else:
            _set(cfg, name, body)


def flatten(cfg: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 0.01}} -> {"optim.lr": 0.01}: a `Config.to_dict()` (or a run's config.toml) by dotted key."""
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `to_dict()` output (a checkpoint's or a run directory's config)."""
    cfg = Config()
    _apply(cfg, data)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that need several keys at once."""
    t, d = cfg.train, cfg.data
    for key, value in [("train.micro_batch", t.micro_batch), ("train.grad_accum", t.grad_accum),
                       ("train.max_steps", t.max_steps), ("data.seq_len", d.seq_len),
                       ("data.num_streams", d.num_streams), ("log.log_every", cfg.log.log_every)]:
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    for key, value in [("train.eval_every", t.eval_every), ("train.save_every", t.save_every),
                       ("train.keep_last", t.keep_last)]:
        if value < 0:
            raise ConfigError(f"{key} must be >= 0 (0 disables it), got {value}")
    if not 0.0 <= t.warmup_frac < 1.0:
        raise ConfigError(f"train.warmup_frac must be in [0, 1), got {t.warmup_frac}")
    if t.dtype not in ("auto", "float32", "bfloat16"):
        raise ConfigError(f"train.dtype must be auto, float32 or bfloat16, got {t.dtype!r}")
    if t.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device must be auto, cpu or cuda, got {t.device!r}")


def field_comments() -> dict[str, str]:
    """{"section.key": its trailing comment in this file}: the documentation `--help` prints."""
    import inspect
    import re
    out = {}
    for f in dataclasses.fields(Config):
        if f.name == "deepspeed":
            continue
        cls = type(getattr(Config(), f.name))
        for line in inspect.getsource(cls).splitlines():
            m = re.match(r"\s+(\w+): \w+ = .*?#\s*(.*)$", line)
            if m:
                out[f"{f.name}.{m.group(1)}"] = m.group(2)
    return out


def usage() -> str:
    """Every config key with its default and comment (python train.py --help)."""
    comments = field_comments()
    lines = ["usage: python train.py --config RECIPE.toml [--section.key=value ...]   (or torchrun / deepspeed)",
             "", "Precedence: command line > TOML recipe > defaults. Keys, defaults and meaning:"]
    cfg = Config()
    for f in dataclasses.fields(Config):
        if f.name == "deepspeed":
            continue
        lines.append(f"  [{f.name}]")
        for k in dataclasses.fields(getattr(cfg, f.name)):
            key = f"{f.name}.{k.name}"
            default = repr(getattr(getattr(cfg, f.name), k.name))
            lines.append((f"    --{key}={default}".ljust(52) + " " + comments.get(key, "")).rstrip())
    lines.append("  --deepspeed=PATH".ljust(53) + "a DeepSpeed JSON (ZeRO stage, precision); launch with deepspeed")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> Config:
    """`--config FILE` first, then `--section.key=value` / `--section.key value` overrides.

    `--local_rank=N` (passed by the deepspeed launcher) is accepted and ignored: LOCAL_RANK is in the env too.
    `--help` / `-h` prints `usage()` and exits 0.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(usage())
        raise SystemExit(0)
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; use --section.key=value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"{arg} needs a value; use {arg}=VALUE")
            key, value = arg[2:], argv[i + 1]
            i += 1
        pairs.append(("local_rank" if key == "local-rank" else key, value))
        i += 1
    cfg = Config()
    for key, value in pairs:
        if key == "config":
            load_toml(cfg, value)
    for key, value in pairs:
        if key not in ("config", "local_rank"):
            _set(cfg, key, value)
    validate(cfg)
    return cfg


def to_toml(cfg: Config) -> str:
    import tomli_w
    return tomli_w.dumps(cfg.to_dict())
