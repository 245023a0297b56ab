"""Optimizers: `build_optimizer(named_params, cfg)` is the one entry point.

    opt = build_optimizer(model.named_parameters(), cfg.optim)   # or build_optimizer(model, cfg.optim)

Names: adamw, adamw8bit, galore, galore8bit, rgp, rgp8bit (see optim/adam.py for the exact update rules and
optim/projection.py for the projection math).  Param groups carry "names" parallel to "params".  All groups
carry "base_lr" (optim.matrix_lr for the projectable matrices, optim.other_lr for the rest; each defaults to
optim.lr); the train loop sets group["lr"] = group["base_lr"] * schedule_multiplier each step.
Layer-wise mode (cfg.layerwise): `LayerwiseStepper(optimizer)` from optim/layerwise.py (no global clipping).
"""
from __future__ import annotations

from typing import Iterable

import torch

from optim.adam import OPTIMIZERS, LowRankAdamW, is_projected, make_groups, projects
from optim.layerwise import LayerwiseStepper
from optim.projection import BASIS_DTYPES, PROJ_TYPES

__all__ = ["OPTIMIZERS", "LayerwiseStepper", "LowRankAdamW", "build_optimizer", "is_projected", "validate_optim_config"]


def validate_optim_config(cfg) -> None:
    """One-line ValueErrors for bad optimizer knobs (shape-dependent checks happen in build_optimizer)."""
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.name!r}; set optim.name to one of {', '.join(OPTIMIZERS)}")
    if not cfg.lr > 0:   # (also catches NaN) lr 0 trains nothing while looking like a run
        raise ValueError(f"optim.lr must be > 0, got {cfg.lr}")
    for key in ("matrix_lr", "other_lr"):
        if not getattr(cfg, key, 0.0) >= 0:
            raise ValueError(f"optim.{key} must be >= 0 (0: optim.lr), got {getattr(cfg, key)}")
    if not (0.0 <= cfg.beta1 < 1.0 and 0.0 <= cfg.beta2 < 1.0):
        raise ValueError(f"optim.beta1/beta2 must be in [0, 1), got {cfg.beta1}, {cfg.beta2}")
    if cfg.eps < 0:
        raise ValueError(f"optim.eps must be >= 0, got {cfg.eps}")
    if getattr(cfg, "comm_dtype", "auto") not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"optim.comm_dtype must be auto, float32 or bfloat16, got {cfg.comm_dtype!r}")
    if getattr(cfg, "lowrank_comm", False) and not projects(cfg.name):
        raise ValueError(f"optim.lowrank_comm needs a projected optimizer (galore, rgp or their 8-bit variants), "
                         f"not {cfg.name}; drop --optim.lowrank_comm")
    if getattr(cfg, "lowrank_update", False) and not getattr(cfg, "lowrank_comm", False):
        raise ValueError("optim.lowrank_update needs optim.lowrank_comm=true (every rank keeps the bases)")
    if not projects(cfg.name):
        return
    if cfg.rank < 1:
        raise ValueError(f"optim.rank must be >= 1 for {cfg.name}, got {cfg.rank}; set optim.rank (e.g. 128)")
    if cfg.update_proj_gap < 1:
        raise ValueError(f"optim.update_proj_gap must be >= 1 for {cfg.name}, got {cfg.update_proj_gap}; "
                         f"set it to the refresh interval T (e.g. 200)")
    if cfg.proj_type not in PROJ_TYPES:
        raise ValueError(f"unknown optim.proj_type {cfg.proj_type!r}; use one of {', '.join(PROJ_TYPES)}")
    if cfg.oversampling < 0 or cfg.power_iters < 0:
        raise ValueError(f"optim.oversampling and optim.power_iters must be >= 0, got "
                         f"{cfg.oversampling}, {cfg.power_iters}")
    if cfg.moments_on_refresh not in ("keep", "project"):
        raise ValueError(f"optim.moments_on_refresh must be keep or project, got {cfg.moments_on_refresh!r}")
    # rank schedules and basis precision (docs/design.md, "Rank schedules and basis precision")
    decay, energy = getattr(cfg, "rank_decay", 1.0), getattr(cfg, "rank_energy", 0.0)
    min_rank, basis_dtype = getattr(cfg, "min_rank", 1), getattr(cfg, "basis_dtype", "float32")
    if not decay >= 1.0:   # (also catches NaN)
        raise ValueError(f"optim.rank_decay must be >= 1 (1: off; 2 halves the rank at every refresh), got {decay}")
    if not 0.0 <= energy < 1.0:
        raise ValueError(f"optim.rank_energy must be in [0, 1) (0: off; e.g. 0.9 keeps 90% of the gradient's "
                         f"energy), got {energy}")
    if min_rank < 1:
        raise ValueError(f"optim.min_rank must be >= 1, got {min_rank}; set it to the smallest rank to decay to (e.g. 4)")
    if (decay != 1.0 or energy > 0) and min_rank > cfg.rank:
        raise ValueError(f"optim.min_rank {min_rank} exceeds optim.rank {cfg.rank}; set optim.min_rank <= optim.rank")
    if basis_dtype not in BASIS_DTYPES:
        raise ValueError(f"unknown optim.basis_dtype {basis_dtype!r}; use one of {', '.join(BASIS_DTYPES)}")
    if getattr(cfg, "lowrank_comm", False):
        # every rank keeps every basis at the fixed shape (rows, optim.rank) in fp32 (optim/sharded.py)
        for key, off in (("rank_decay", decay == 1.0), ("rank_energy", energy == 0.0),
                         ("basis_dtype", basis_dtype == "float32")):
            if not off:
                raise ValueError(f"optim.{key}={getattr(cfg, key)!r} is not supported with optim.lowrank_comm yet; "
                                 f"turn one off")


def build_optimizer(named_params: Iterable | torch.nn.Module, cfg, shapes: dict | None = None) -> LowRankAdamW:
    """An optimizer over `named_params` ((name, parameter) pairs, or a module) configured by `cfg`
    (an `OptimConfig`).  Works for any subset of a model's parameters, including one with no projected
    params; parameters with requires_grad=False are left out. shapes: name -> whole shape, for tensors that are
    flat slices of a parameter (the sharded optimizer's): they are grouped as that parameter."""
    validate_optim_config(cfg)
    if isinstance(named_params, torch.nn.Module):
        named_params = named_params.named_parameters()
    pairs = list(named_params)
    for item in pairs:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError("build_optimizer needs (name, parameter) pairs, e.g. model.named_parameters()")
    groups = make_groups(pairs, cfg.name, cfg, shapes)
    return LowRankAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                        weight_decay=cfg.weight_decay)
