"""Check that a checkpoint is complete and loadable, without starting a run (no process group, no data, no GPU).

    python tools/check_checkpoint.py runs/tiny_rgp/checkpoints/step_00000100   # one checkpoint
    python tools/check_checkpoint.py runs/tiny_rgp                             # every complete checkpoint of a run

Checks, one printed line each (`ok` or `FAIL` + a one-line reason naming the file):
  meta.json       parses; has step, config and model_args
  model.pt        loads with torch.load(weights_only=True); its keys and shapes equal those of
                  model.llama.Llama(LlamaArgs(**meta["model_args"])) built on the meta device
  data streams    data_stream{s:03d}.pt exists and loads for every s in range(config["data"]["num_streams"])
  optimizer       optim_manifest.json parses; every rank file it lists exists and loads; the manifest's plan
                  names exactly the model's parameters; every whole parameter is listed (param_groups) in
                  exactly one rank file, the one of the rank the plan names (optim/ownership.py), a sliced one
                  (plan -1) in rank files whose slice ranges cover it exactly once; state only for listed ones
  rng states      rng_rank{r:05d}.pt exists and loads for every rank r < meta["world_size"]
                  (missing ones still resume, but not bit-identically)
Exit status 0 when every checked checkpoint passes, 1 otherwise. For a run directory the newest good
checkpoint is reported, so `--train.resume=PATH` can skip a damaged newer one. `step_*.tmp` directories are
interrupted writes (checkpoint.py writes atomically) and are listed, not checked.
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

import checkpoint_files  # noqa: E402
from checkpoint import complete_checkpoints  # noqa: E402

Result = tuple[bool, str, str]  # (passed, check name, detail or reason)


def _load(path: Path):
    """torch.load(weights_only=True) -> (object, None) or (None, one-line reason naming the file)."""
    if not path.is_file():
        return None, f"{path.name} is missing"
    try:
        return torch.load(path, map_location="cpu", weights_only=True), None
    except Exception as e:  # truncated zip, pickle of a non-allowlisted type, ...
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        return None, f"{path.name} does not load ({type(e).__name__}: {reason})"


def check_meta(ckpt: Path) -> tuple[Result, dict | None]:
    name = checkpoint_files.META
    try:
        meta = json.loads((ckpt / name).read_text())
    except FileNotFoundError:
        return (False, name, f"{name} is missing (an incomplete checkpoint)"), None
    except (OSError, json.JSONDecodeError) as e:
        return (False, name, f"{name} does not parse ({type(e).__name__})"), None
    missing = [k for k in ("step", "config", "model_args") if k not in meta]
    if missing:
        return (False, name, f"{name} lacks {', '.join(missing)}"), None
    return (True, name, f"step {meta['step']}, tokens {meta.get('tokens', '?')}, "
                               f"world size {meta.get('world_size', '?')}"), meta


def expected_shapes(model_args: dict) -> dict[str, tuple]:
    """state_dict key -> shape of the model meta.json describes (meta device: no memory)."""
    from model.llama import Llama, LlamaArgs
    with torch.device("meta"):
        model = Llama(LlamaArgs(**model_args))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_model(ckpt: Path, expected: dict[str, tuple]) -> Result:
    name, meta = checkpoint_files.MODEL, checkpoint_files.META
    state, err = _load(ckpt / name)
    if err:
        return False, name, err
    if not isinstance(state, dict):
        return False, name, f"{name} holds a {type(state).__name__}, not a state_dict"
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        what = f"lacks {missing[0]!r}" if missing else f"has unexpected {extra[0]!r}"
        return False, name, (f"{name} {what} ({len(missing)} missing, {len(extra)} unexpected keys "
                             f"vs {meta} model_args)")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            return False, name, f"{name} {k!r} has shape {tuple(state[k].shape)}, {meta} implies {shape}"
    numel = sum(v.numel() for v in state.values())
    return True, name, f"{len(state)} tensors, {numel / 1e6:.2f}M values, shapes match model_args"


def _check_numbered(ckpt: Path, label: str, count, file_name, lacks: str) -> Result:
    """Files file_name(0 .. count-1) all exist and load."""
    if not isinstance(count, int) or count < 1:
        return False, label, lacks
    for i in range(count):
        _, err = _load(ckpt / file_name(i))
        if err:
            return False, label, err
    files = file_name(0) if count == 1 else f"{file_name(0)} .. {file_name(count - 1)}"
    return True, label, f"{count} file(s) {files} load"


def check_data_streams(ckpt: Path, config: dict) -> Result:
    return _check_numbered(ckpt, "data streams", config.get("data", {}).get("num_streams"),
                           checkpoint_files.data_stream_file, f"{checkpoint_files.META} config lacks data.num_streams")


def check_optimizer(ckpt: Path, param_names: set[str]) -> Result:
    mname = checkpoint_files.OPTIM_MANIFEST
    try:
        manifest = json.loads((ckpt / mname).read_text())
        files, plan = manifest["files"], manifest["plan"]
    except FileNotFoundError:
        return False, "optimizer", f"{mname} is missing"
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        return False, "optimizer", f"{mname} is unreadable ({type(e).__name__})"
    if set(plan) != param_names:
        diff = sorted(set(plan) ^ param_names)
        where = "the manifest" if diff[0] in plan else "the model"
        return False, "optimizer", f"{mname} plan does not match the model: {diff[0]!r} is in {where} only"
    # A rank file lists the parameters its rank owns in param_groups (names, in optimizer order) and their
    # state under "state"; a parameter that never had a finite gradient owns no state yet but is still listed.
    seen: dict[str, str] = {}
    pieces: dict[str, list] = {}
    stateless = 0
    for rank, fname in enumerate(files):
        sd, err = _load(ckpt / fname)
        if err:
            return False, "optimizer", err
        if not isinstance(sd, dict):
            return False, "optimizer", f"{fname} holds a {type(sd).__name__}, not an optimizer state dict"
        listed = [n for g in sd.get("param_groups", []) for n in g.get("params", [])]
        state = set(sd.get("state", {})) | set(sd.get("masters", {}))
        if not set(state) <= set(listed):
            odd = sorted(set(state) - set(listed))[0]
            return False, "optimizer", f"{fname} holds state for {odd!r} but does not list it in param_groups"
        stateless += len(set(listed) - state)
        for n in listed:
            if n not in param_names:
                return False, "optimizer", f"{fname} holds {n!r}, which the model does not have"
            if plan[n] == -1:                    # sliced across the ranks: each file holds a range of it
                r = sd.get("slices", {}).get(n)
                if r is None:
                    return False, "optimizer", f"{fname} lists the sliced {n!r} without its slice range"
                pieces.setdefault(n, []).append((int(r[0]), int(r[1]), int(r[2]), fname))
                continue
            if n in seen:
                return False, "optimizer", f"{n!r} is in both {seen[n]} and {fname}"
            if plan[n] != rank:
                return False, "optimizer", f"{fname} holds {n!r}, which the manifest assigns to rank {plan[n]}"
            seen[n] = fname
    for n, ps in sorted(pieces.items()):      # a sliced parameter: its ranges cover it exactly once
        ps.sort()
        ends = [0] + [e for _, e, _, _ in ps]
        if [a for a, _, _, _ in ps] != ends[:-1] or ends[-1] != ps[0][2]:
            return False, "optimizer", (f"the slices of {n!r} in the rank files do not cover its {ps[0][2]} values "
                                        f"once: {[(a, e) for a, e, _, _ in ps]}")
        seen[n] = ps[0][3]
    missing = sorted(param_names - set(seen))
    if missing:
        return False, "optimizer", (f"no rank file holds {missing[0]!r} "
                                    f"({len(missing)} of {len(param_names)} parameters uncovered)")
    note = f", {stateless} without state yet (no finite gradient so far)" if stateless else ""
    return True, "optimizer", (f"{manifest.get('optimizer', '?')}: {len(files)} rank file(s) load, "
                               f"{len(seen)} parameters covered once each{note}")


def check_rng(ckpt: Path, world_size) -> Result:
    return _check_numbered(ckpt, "rng states", world_size, checkpoint_files.rng_file,
                           f"{checkpoint_files.META} lacks world_size")


def check_checkpoint(ckpt: str | Path) -> list[Result]:
    """Every check of one checkpoint directory; stops after meta.json if that fails (nothing else is knowable)."""
    ckpt = Path(ckpt)
    meta_result, meta = check_meta(ckpt)
    results = [meta_result]
    if meta is None:
        return results
    try:
        expected = expected_shapes(meta["model_args"])
    except (TypeError, ValueError) as e:
        return results + [(False, checkpoint_files.MODEL,
                           f"{checkpoint_files.META} model_args do not build a model ({e})")]
    params = {k for k in expected}  # Llama's persistent state is exactly its parameters (rope tables are not saved)
    results.append(check_model(ckpt, expected))
    results.append(check_data_streams(ckpt, meta["config"]))
    results.append(check_optimizer(ckpt, params))
    results.append(check_rng(ckpt, meta.get("world_size")))
    return results


def checkpoints_of(path: Path) -> tuple[list[Path], list[Path]]:
    """(checkpoints to check, interrupted .tmp dirs) for a checkpoint dir or a run dir."""
    if (path / checkpoint_files.META).is_file() or checkpoint_files.STEP_DIR.match(path.name):
        return [path], []
    root = path / checkpoint_files.CHECKPOINTS
    tmp = sorted(p for p in root.iterdir() if checkpoint_files.TMP_STEP_DIR.match(p.name)) if root.is_dir() else []
    return complete_checkpoints(path), tmp


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("path", help="a checkpoint directory (step_XXXXXXXX) or a run directory")
    args = ap.parse_args(argv)
    path = Path(args.path)
    if not path.is_dir():
        print(f"FAIL {path}: not a directory")
        return 1
    ckpts, tmp = checkpoints_of(path)
    for t in tmp:
        print(f"note {t}: interrupted write (.tmp), ignored by --train.resume=auto")
    if not ckpts:
        print(f"FAIL {path}: no complete checkpoint (no {checkpoint_files.CHECKPOINTS}/step_*/{checkpoint_files.META})")
        return 1
    good, all_ok = [], True
    for ckpt in ckpts:
        results = check_checkpoint(ckpt)
        print(f"{ckpt}:")
        for ok, name, detail in results:
            print(f"  {'ok  ' if ok else 'FAIL'} {name}: {detail}")
        if all(ok for ok, _, _ in results):
            good.append(ckpt)
        else:
            all_ok = False
    if len(ckpts) > 1 or not all_ok:
        print(f"newest good checkpoint: {good[-1]}" if good else "no good checkpoint")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
