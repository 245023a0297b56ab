"""AdamW family with optional low-rank gradient projection (GaLore / RGP) and 8-bit states.

One optimizer class, `LowRankAdamW`, whose `step()` loops over parameters and calls pure per-parameter
functions.  Every parameter's update depends only on its own gradient and state (no cross-parameter
coupling), so the same class serves any subset of a model's parameters (the sharded wrapper builds one per
rank for the parameters that rank owns) and the layer-wise mode (one parameter at a time from a hook).

Update rules (each reproduces a reference implementation on CPU; tests/optim check them):

* plain fp32 Adam (`adamw_update`, and `adamw_update_foreach` for a group's fp32 params in `step()`):
  `torch.optim.AdamW` single-tensor (foreach=False) and multi-tensor (foreach=True) math, bit for bit:
  p *= 1 - lr*wd; m.lerp_(g, 1-b1); v = b2*v + (1-b2)*g^2; p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps).
* plain 8-bit Adam (`adamw8bit_update`): `bitsandbytes.optim.AdamW8bit` as its CPU backend runs it
  (bitsandbytes/backends/cpu/ops.py): dequantize the blockwise (blocksize 256) 8-bit moments with the signed
  dynamic map (m) / unsigned dynamic map (v), update in fp32, re-quantize; tensors with fewer than 4096
  elements keep fp32 state and use bnb's 32-bit CPU math (eps scaled by sqrt(bc2), weight decay first).
* projected Adam (`lowrank_adam_update`): `galore_torch.GaLoreAdamW` math, deliberately - the differential
  test holds us to it: the basis is refreshed when the per-parameter step counter (before its increment) is a
  multiple of T (steps 0, T, 2T, ...); m = b1*m + (1-b1)*R; v = b2*v + (1-b2)*R^2 on the low-rank gradient R;
  denom = sqrt(v) + eps (eps *not* scaled by the bias correction, unlike torch); step_size = lr*sqrt(bc2)/bc1;
  p -= step_size * scale * project_back(m/denom); then p -= lr*wd*p (decoupled decay applied after the update,
  as galore does).  In the 8-bit variants the low-rank moments are stored as bnb blockwise 8-bit codes
  (same maps and blocksize as above, and the same 4096-element threshold) and the math runs in fp32
  between dequantize and re-quantize.

Non-finite gradients never reach the SVD: when a refresh is due and the gradient has a NaN/inf, the refresh
is skipped with a warning and the old basis is kept (the update itself then proceeds exactly as plain AdamW
would with that gradient - skipping bad steps is the trainer's `train.skip_nonfinite`).  If the parameter has
no basis yet, its whole update is skipped for this step (its step counter does not advance, so the first
finite gradient builds the basis at "step 0").

State (`state_dict()`) holds only tensors and Python numbers: "step" (int), "exp_avg"/"exp_avg_sq" (fp32) or
"state1"/"state2" (uint8 codes) with "absmax1"/"absmax2" (fp32), and "basis" for projected params (fp32, or
bf16, or int8 codes with a per-column fp32 "basis_scale": optim.basis_dtype).
The dynamic quantization maps are constants (`bitsandbytes.functional.create_dynamic_map`), not state.

Rank schedules (docs/design.md, "Rank schedules and basis precision"): with optim.rank_decay > 1 or
optim.rank_energy > 0 a refresh may install a basis of another rank r2 than the old one's r1. The moments
follow: moments_on_refresh="project" re-expresses them with the (rectangular, r1 x r2) change of basis,
"keep" keeps their first r2 coordinates; 8-bit moments are dequantized, resized and re-quantized in the same
format (8-bit or fp32, decided once by bnb's size rule at the start rank optim.rank, so no resize ever makes
the state bigger than `state_bytes`). The state's tensors really shrink; a matrix's current rank is its basis'
second dimension (`LowRankAdamW.current_ranks()`).
"""
from __future__ import annotations

import math
import warnings
from typing import Iterable

import torch

from optim import projection as proj

FOREACH_CHUNK_NUMEL = 2**24   # the multi-tensor Adam update runs over chunks of at most this many elements (or one
                              # bigger tensor): its fp32 temporaries stay ~64 MiB instead of 4 bytes x the model
BLOCKSIZE = 256          # bnb's 8-bit optimizers use blockwise quantization with 256-value blocks
MIN_8BIT_SIZE = 4096     # bnb's min_8bit_size: smaller tensors keep fp32 state

_QMAPS: dict = {}


def qmaps(device) -> tuple[torch.Tensor, torch.Tensor]:
    """(signed dynamic map for m, unsigned dynamic map for v) on `device`, as bnb's `fill_qmap` builds them."""
    key = str(device)
    if key not in _QMAPS:
        import bitsandbytes.functional as bnbF
        with torch.device("cpu"):   # bnb builds the map with no device=: pin it against a user's default device
            maps = bnbF.create_dynamic_map(signed=True), bnbF.create_dynamic_map(signed=False)
        _QMAPS[key] = tuple(m.to(device) for m in maps)
    return _QMAPS[key]


def quantize(x: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 tensor -> (uint8 codes of the same shape, fp32 absmax per 256-value block)."""
    import bitsandbytes.functional as bnbF
    out, qs = bnbF.quantize_blockwise(x, code=code, blocksize=BLOCKSIZE)
    return out, qs.absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    import bitsandbytes.functional as bnbF
    return bnbF.dequantize_blockwise(codes, absmax=absmax, code=code, blocksize=BLOCKSIZE).float()


# ----------------------------------------------------------------------------------------------- state

def quantized(numel: int, bits: int) -> bool:
    """Are the moments of a tensor of `numel` values 8-bit codes? bnb's rule: small tensors keep fp32 moments."""
    return bits == 8 and numel >= MIN_8BIT_SIZE


def init_moments(like: torch.Tensor, bits: int, whole_numel: int | None = None) -> dict:
    """Zero Adam moments shaped like `like`: fp32, or 8-bit codes + absmax when bits == 8 and it is large enough.
    whole_numel: `like` is a slice of a tensor of that many values (optim/ownership.py): bnb's small-tensor rule
    is applied to the whole tensor, so every slice is stored as the whole tensor would be."""
    if quantized(whole_numel or like.numel(), bits):
        blocks = (like.numel() + BLOCKSIZE - 1) // BLOCKSIZE
        zeros8 = lambda: torch.zeros(like.shape, dtype=torch.uint8, device=like.device)  # noqa: E731
        absmax = lambda: torch.zeros(blocks, dtype=torch.float32, device=like.device)    # noqa: E731
        return {"state1": zeros8(), "absmax1": absmax(), "state2": zeros8(), "absmax2": absmax()}
    return {"exp_avg": torch.zeros(like.shape, dtype=torch.float32, device=like.device),
            "exp_avg_sq": torch.zeros(like.shape, dtype=torch.float32, device=like.device)}


def is_8bit(state: dict) -> bool:
    return "state1" in state


def load_moments(state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 views/copies of the moments (the stored tensors themselves when fp32)."""
    if is_8bit(state):
        m_map, v_map = qmaps(state["state1"].device)
        return (dequantize(state["state1"], state["absmax1"], m_map),
                dequantize(state["state2"], state["absmax2"], v_map))
    return state["exp_avg"], state["exp_avg_sq"]


def replace_moments(state: dict, m: torch.Tensor, v: torch.Tensor) -> None:
    """Install fp32 moments of a new shape (a rank change) in the state's existing format: new tensors, so the
    old ones are freed. Same shape: `store_moments`."""
    if m.shape == (state["state1"] if is_8bit(state) else state["exp_avg"]).shape:
        store_moments(state, m, v)
    elif is_8bit(state):
        m_map, v_map = qmaps(m.device)
        state["state1"], state["absmax1"] = quantize(m.contiguous(), m_map)
        state["state2"], state["absmax2"] = quantize(v.contiguous(), v_map)
    else:
        state["exp_avg"], state["exp_avg_sq"] = m.contiguous(), v.contiguous()


def load_basis(state: dict) -> torch.Tensor:
    """The fp32 basis the projection uses (the stored tensor itself when optim.basis_dtype is float32)."""
    return proj.dequantize_basis(state["basis"], state.get("basis_scale"))


def store_basis(state: dict, basis: torch.Tensor, basis_dtype: str) -> torch.Tensor:
    """Keep `basis` (fp32) in optim.basis_dtype; returns the fp32 basis the projection will use (its rounding)."""
    stored, scale = proj.quantize_basis(basis, basis_dtype)
    state["basis"] = stored
    state.pop("basis_scale", None)
    if scale is not None:
        state["basis_scale"] = scale
    return proj.dequantize_basis(stored, scale)


def store_moments(state: dict, m: torch.Tensor, v: torch.Tensor) -> None:
    """Write fp32 moments back (re-quantize in the 8-bit case; no-op for fp32 state updated in place)."""
    if is_8bit(state):
        m_map, v_map = qmaps(m.device)
        c1, a1 = quantize(m, m_map)
        c2, a2 = quantize(v, v_map)
        state["state1"].copy_(c1)
        state["absmax1"].copy_(a1)
        state["state2"].copy_(c2)
        state["absmax2"].copy_(a2)
    elif m is not state["exp_avg"]:
        state["exp_avg"].copy_(m)
        state["exp_avg_sq"].copy_(v)


# ------------------------------------------------------------------------------------- pure update rules

@torch.no_grad()
def adamw_update(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """torch.optim.AdamW(foreach=False) single-tensor math; `step` is the already-incremented (1-based) count."""
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step = float(step)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2 ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-step_size)


@torch.no_grad()
def adamw_update_foreach(params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, steps: list[int], lr: float,
                         beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """`adamw_update` over many fp32 tensors at once with multi-tensor (`torch._foreach_*`) kernels: the op
    sequence of torch.optim.AdamW(foreach=True) without amsgrad/capturable, hence the same numbers as the
    single-tensor form (tests/optim check both). On a GPU this is a handful of kernel launches per group
    instead of a dozen per parameter. `steps`: each tensor's already-incremented (1-based) count."""
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    step_size = [(lr / (1 - beta1 ** float(s))) * -1 for s in steps]
    bias_correction2_sqrt = [(1 - beta2 ** float(s)) ** 0.5 for s in steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)


@torch.no_grad()
def adamw8bit_update(p: torch.Tensor, grad: torch.Tensor, state: dict, step: int, lr: float, beta1: float,
                     beta2: float, eps: float, weight_decay: float) -> None:
    """bitsandbytes.optim.AdamW8bit on CPU (bnb 0.50 backends/cpu/ops.py), one parameter.

    8-bit state: dequantize, fp32 Adam, re-quantize.  fp32 state (params < 4096 elements): bnb's 32-bit math.
    """
    g = grad.float()
    p32 = p.data.float()
    correction1 = 1.0 - beta1 ** step
    correction2 = math.sqrt(1.0 - beta2 ** step)
    if is_8bit(state):
        m, v = load_moments(state)
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = (v.sqrt() / correction2).add_(eps)
        if weight_decay > 0.0:
            p32.mul_(1.0 - lr * weight_decay)
        p32.addcdiv_(m, denom, value=-lr / correction1)
        p.data.copy_(p32)
        store_moments(state, m, v)
    else:
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        step_size = -lr * correction2 / correction1
        if weight_decay > 0.0:
            p32.mul_(1.0 - lr * weight_decay)
        update = m / (v.sqrt() + eps * correction2)
        p32.add_(update, alpha=step_size)
        p.data.copy_(p32)


@torch.no_grad()
def galore_adam_direction(low_grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int,
                          beta1: float, beta2: float, eps: float) -> tuple[torch.Tensor, float, float]:
    """GaLoreAdamW's moment update on the low-rank gradient; returns (m/denom, bc1, bc2).  m, v in place."""
    m.mul_(beta1).add_(low_grad, alpha=(1.0 - beta1))
    v.mul_(beta2).addcmul_(low_grad, low_grad, value=1.0 - beta2)
    denom = v.sqrt().add_(eps)
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    return m / denom, bias_correction1, bias_correction2


@torch.no_grad()
def lowrank_adam_update(p: torch.Tensor, grad: torch.Tensor, state: dict, *, name: str, lr: float,
                        beta1: float, beta2: float, eps: float, weight_decay: float, rank: int,
                        update_proj_gap: int, scale: float, proj_type: str, method: str, oversampling: int,
                        power_iters: int, moments_on_refresh: str, bits: int, rank_decay: float = 1.0,
                        min_rank: int = 1, rank_energy: float = 0.0, basis_dtype: str = "float32") -> bool:
    """One GaLore/RGP step of a 2-D parameter.  Returns False when the update was skipped (no basis yet and a
    non-finite gradient). `rank` is the start rank: the refresh at step k*T uses at most
    scheduled_rank(rank, rank_decay, min_rank, k), fewer with rank_energy > 0 (optim/projection.py)."""
    side = proj.choose_side(p.shape, proj_type)
    step = state.get("step", 0)
    old = state.get("basis")
    if old is None or step % update_proj_gap == 0:
        if not bool(torch.isfinite(grad).all()):
            warnings.warn(f"non-finite gradient for {name or tuple(p.shape)} at step {step}: projection refresh "
                          f"skipped, {'old basis kept' if old is not None else 'no basis yet, update skipped'}")
            if old is None:
                return False
        else:
            cap = proj.scheduled_rank(rank, rank_decay, min_rank, step // update_proj_gap)
            if method == "svd":
                new = proj.exact_basis(grad, cap, side, energy=rank_energy, min_rank=min_rank)
            else:
                new = proj.randomized_basis(grad, cap, side, oversampling, power_iters, name=name, step=step,
                                            energy=rank_energy, min_rank=min_rank)
            set_basis(state, new, side, moments_on_refresh, basis_dtype=basis_dtype)
    g32 = grad if grad.dtype == torch.float32 else grad.float()
    basis = load_basis(state)
    low = proj.project(g32, basis, side)
    # 8-bit or fp32 moments is decided at the start rank, so no later rank makes the state bigger (module doc)
    start_numel = rank * (p.shape[0] if side == "right" else p.shape[1])
    lowrank_adam_apply(p, low, state, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                       scale=scale, side=side, bits=bits, basis=basis, whole_numel=start_numel)
    return True


@torch.no_grad()
def set_basis(state: dict, new: torch.Tensor, side: str, moments_on_refresh: str,
              basis_dtype: str = "float32") -> None:
    """Install a refreshed fp32 basis, stored in `basis_dtype`. The moments follow it: "project" re-expresses them
    in the new basis (rectangular when the rank changes), "keep" keeps them as they are, cut to (or padded with
    zeros up to) the new rank. Both use the bases the projection really uses (their dequantized copies)."""
    old = load_basis(state) if state.get("basis") is not None else None
    new = store_basis(state, new, basis_dtype)
    if old is None or "step" not in state:
        return
    if moments_on_refresh == "project":
        m, v = load_moments(state)
        m2, v2 = proj.reproject_moments(m, v, proj.change_of_basis(old, new, side), side)
        replace_moments(state, m2, v2)
    elif old.shape[1] != new.shape[1]:
        m, v = load_moments(state)
        replace_moments(state, proj.resize_moment(m, new.shape[1], side), proj.resize_moment(v, new.shape[1], side))


@torch.no_grad()
def lowrank_adam_apply(p: torch.Tensor, low: torch.Tensor, state: dict, *, lr: float, beta1: float, beta2: float,
                       eps: float, weight_decay: float, scale: float, side: str, bits: int,
                       basis: torch.Tensor | None = None, whole_numel: int | None = None) -> None:
    """The update from the projected gradient `low` in the state's basis (GaLoreAdamW's math; `basis`: its fp32
    copy when the caller has already dequantized it). The sharded optimizer's low-rank communication hands owners
    `low` directly (optim/sharded.py)."""
    norm_grad, step_size = lowrank_adam_direction(low, state, lr=lr, beta1=beta1, beta2=beta2, eps=eps, bits=bits,
                                                  whole_numel=whole_numel)
    apply_lowrank_update(p, norm_grad, load_basis(state) if basis is None else basis, side, step_size=step_size,
                         scale=scale, lr=lr, weight_decay=weight_decay)


@torch.no_grad()
def lowrank_adam_direction(low: torch.Tensor, state: dict, *, lr: float, beta1: float, beta2: float, eps: float,
                           bits: int, whole_numel: int | None = None) -> tuple[torch.Tensor, float]:
    """Adam on the projected gradient: moments and step count in `state` advance; returns (m / denom, step size).
    The low-rank update of the matrix is step size x scale x project_back(m / denom). `whole_numel`: the moments'
    size at the start rank, which decides 8-bit vs fp32 moments (`init_moments`; default: low's size)."""
    step = state.get("step", 0)
    if "step" not in state:
        state.update(init_moments(low, bits, whole_numel))
    step += 1
    state["step"] = step
    m, v = load_moments(state)
    norm_grad, bc1, bc2 = galore_adam_direction(low, m, v, step, beta1, beta2, eps)
    store_moments(state, m, v)
    return norm_grad, lr * math.sqrt(bc2) / bc1              # galore's exact expression order


@torch.no_grad()
def apply_lowrank_update(p: torch.Tensor, norm_grad: torch.Tensor, basis: torch.Tensor, side: str, *,
                         step_size: float, scale: float, lr: float, weight_decay: float) -> None:
    """p -= step_size x scale x project_back(norm_grad), then decoupled decay (galore's order). Deterministic in
    its inputs: ranks that apply the same (norm_grad, basis, step_size) to equal copies stay bit-identical."""
    full = proj.project_back(norm_grad, basis, side) * scale
    p.add_(full.to(p.dtype), alpha=-step_size)
    if weight_decay > 0.0:
        p.add_(p, alpha=(-lr * weight_decay))


# --------------------------------------------------------------------------------------------- optimizer

OPTIMIZERS = ("adamw", "adamw8bit", "galore", "galore8bit", "rgp", "rgp8bit")
_GROUP_CHECK_KEYS = ("optim", "kind", "bits", "rank", "proj_type", "method", "names")


def projects(optim_name: str) -> bool:
    """Does optimizer `optim_name` project any parameter (GaLore, RGP and their 8-bit variants)?"""
    return optim_name.removesuffix("8bit") in ("galore", "rgp")


def is_projected(name: str, shape) -> bool:
    """GaLore's rule, for an optimizer that `projects`: the 2-D weights of attention and MLP are projected;
    embeddings, lm_head and norms stay on AdamW. `shape` is the parameter's shape (p.shape)."""
    if torch.is_tensor(shape):   # len() of a tensor is its first dimension: that would answer silently wrong
        raise TypeError("is_projected takes the parameter's shape (p.shape), not the parameter")
    return len(shape) == 2 and "embed" not in name and "lm_head" not in name


def moment_bytes(numel: int, bits: int) -> int:
    """Bytes of the two Adam moments of `numel` values as `init_moments` lays them out: fp32, or uint8 codes and
    one fp32 absmax per BLOCKSIZE values each."""
    if quantized(numel, bits):
        return 2 * numel + 2 * 4 * math.ceil(numel / BLOCKSIZE)
    return 2 * 4 * numel


BASIS_VALUE_BYTES = {"float32": 4, "bfloat16": 2, "int8": 1}


def basis_bytes_of(rows: int, rank: int, basis_dtype: str = "float32") -> int:
    """Bytes of a (rows, rank) basis stored in `basis_dtype` (int8: plus one fp32 scale per column)."""
    return rows * rank * BASIS_VALUE_BYTES[basis_dtype] + (4 * rank if basis_dtype == "int8" else 0)


def basis_bytes(name: str, shape, cfg) -> int:
    """The projection basis' share of `state_bytes` at the start rank (0 for a parameter that is not projected)."""
    if not (projects(cfg.name) and is_projected(name, shape)):
        return 0
    m, n = int(shape[0]), int(shape[1])
    rows = n if proj.choose_side((m, n), cfg.proj_type) == "right" else m
    return basis_bytes_of(rows, cfg.rank, getattr(cfg, "basis_dtype", "float32"))


def state_bytes(name: str, shape, cfg) -> int:
    """Bytes of one parameter's optimizer state under `cfg` (an OptimConfig) once it has stepped, as LowRankAdamW
    lays it out: the moments, plus for a projected (m, n) weight the basis (in optim.basis_dtype), with moments of
    the projected gradient's shape. The one model of state bytes (the ownership plan, tools/estimate_memory.py and
    bench/memory.py use it); tests/optim hold it to the real optimizer's state.
    Always at the start rank optim.rank: rank_decay and rank_energy only ever lower a matrix's rank below it and
    the moments keep the format chosen at that rank, so this is the peak (the first basis) and an upper bound
    afterwards, when the real state shrinks (LowRankAdamW.current_ranks() says to which ranks)."""
    bits = 8 if cfg.name.endswith("8bit") else 32
    if not (projects(cfg.name) and is_projected(name, shape)):
        return moment_bytes(math.prod(int(s) for s in shape), bits)
    m, n = int(shape[0]), int(shape[1])
    proj.check_rank((m, n), cfg.rank, name)           # the optimizer refuses a rank above min(m, n) too
    side = proj.choose_side((m, n), cfg.proj_type)    # "right": basis (n, r), moments (m, r); "left": (m, r), (r, n)
    moment_cols = m if side == "right" else n
    return basis_bytes(name, shape, cfg) + moment_bytes(cfg.rank * moment_cols, bits)


class LowRankAdamW(torch.optim.Optimizer):
    """AdamW / GaLore / RGP with fp32 or 8-bit moments.  Build it through `optim.build_optimizer`.

    param groups: {"kind": "lowrank"} (projected params) and/or {"kind": "adam"}; each carries "names"
    parallel to "params" and "optim" (the registry name).  The group layout depends only on the optimizer
    name, never on which parameters were passed (groups may be empty), so any subset works.
    """

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(groups, defaults)
        self.prepared: dict = {}        # param -> projected gradient, set by the sharded optimizer's low-rank comm
        self.defer_updates = False      # True: leave prepared params' updates in self.updates (optim.lowrank_update)
        self.updates: dict = {}         # param -> (m / denom, step size, lr), applied by the sharded optimizer
        self.whole_numel: dict = {}     # param -> size of the tensor it is a slice of (sharded optimizer's slices)
        self._names = {}
        self._groups_of = {}
        self._reindex()

    def add_param_group(self, param_group: dict) -> None:
        param_group.setdefault("names", [])
        super().add_param_group(param_group)
        if hasattr(self, "_names"):
            self._reindex()

    def _reindex(self):
        self._names = {}
        self._groups_of = {}
        for group in self.param_groups:
            if len(group["names"]) != len(group["params"]):
                raise ValueError("param group 'names' must be parallel to 'params'")
            for name, p in zip(group["names"], group["params"]):
                self._names[p] = name
                self._groups_of[p] = group

    @torch.no_grad()
    def step_param(self, p: torch.Tensor, group: dict | None = None) -> None:
        """Update one parameter from its own gradient and state (used by step() and the layer-wise hooks), or,
        for a projected parameter, from a projected gradient the sharded optimizer put in `self.prepared`."""
        if p in self.prepared:
            group = group if group is not None else self._groups_of[p]
            beta1, beta2 = group["betas"]
            if self.defer_updates:             # the sharded optimizer sends the update to every rank to apply
                norm_grad, step_size = lowrank_adam_direction(self.prepared.pop(p), self.state[p], lr=group["lr"],
                                                              beta1=beta1, beta2=beta2, eps=group["eps"],
                                                              bits=group["bits"])
                self.updates[p] = (norm_grad, step_size, group["lr"])
                return
            lowrank_adam_apply(p, self.prepared.pop(p), self.state[p], lr=group["lr"], beta1=beta1, beta2=beta2,
                               eps=group["eps"], weight_decay=group["weight_decay"], scale=group["scale"],
                               side=proj.choose_side(p.shape, group["proj_type"]), bits=group["bits"])
            return
        if p.grad is None:
            return
        group = group if group is not None else self._groups_of[p]
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError("sparse gradients are not supported")
        state = self.state[p]
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        if group["kind"] == "lowrank":
            lowrank_adam_update(
                p, grad, state, name=self._names[p], lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                weight_decay=wd, rank=group["rank"], update_proj_gap=group["update_proj_gap"],
                scale=group["scale"], proj_type=group["proj_type"], method=group["method"],
                oversampling=group["oversampling"], power_iters=group["power_iters"],
                moments_on_refresh=group["moments_on_refresh"], bits=group["bits"],
                rank_decay=group.get("rank_decay", 1.0), min_rank=group.get("min_rank", 1),
                rank_energy=group.get("rank_energy", 0.0), basis_dtype=group.get("basis_dtype", "float32"))
            return
        if group["bits"] == 8:
            grad = grad.contiguous()
            if "step" not in state:
                state["step"] = 0
                state.update(init_moments(p, 8, self.whole_numel.get(p)))
            state["step"] += 1
            adamw8bit_update(p, grad, state, state["step"], lr, beta1, beta2, eps, wd)
        else:
            if "step" not in state:
                state["step"] = 0
                state.update(init_moments(p, 32))
            state["step"] += 1
            if p.dtype == torch.float32:
                adamw_update(p, grad, state["exp_avg"], state["exp_avg_sq"], state["step"], lr, beta1, beta2,
                             eps, wd)
            else:   # low-precision weights without a master copy: fp32 moments and math, rounded once
                p32 = p.detach().float()
                adamw_update(p32, grad.float(), state["exp_avg"], state["exp_avg_sq"], state["step"], lr,
                             beta1, beta2, eps, wd)
                p.copy_(p32)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            rest = group["params"]
            if group["kind"] == "adam" and group["bits"] == 32:
                rest = self._step_adam_foreach(group)
            for p in rest:
                self.step_param(p, group)
        return loss

    def _step_adam_foreach(self, group: dict) -> list:
        """Plain fp32 Adam for the group's fp32 parameters in one multi-tensor update; returns the parameters
        left for the per-parameter path (low-precision weights without a master copy)."""
        batch, rest = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.dtype != torch.float32 or p.grad.is_sparse:
                rest.append(p)
                continue
            state = self.state[p]
            if "step" not in state:
                state["step"] = 0
                state.update(init_moments(p, 32))
            state["step"] += 1
            batch.append(p)
        beta1, beta2 = group["betas"]
        for chunk in _chunks(batch, FOREACH_CHUNK_NUMEL):
            states = [self.state[p] for p in chunk]
            adamw_update_foreach(chunk, [p.grad for p in chunk], [s["exp_avg"] for s in states],
                                 [s["exp_avg_sq"] for s in states], [s["step"] for s in states], group["lr"],
                                 beta1, beta2, group["eps"], group["weight_decay"])
        return rest

    def current_ranks(self) -> dict[str, int]:
        """{parameter name: the rank of its current basis} for the projected parameters that have a basis (none
        before their first step). Constant optim.rank unless optim.rank_decay / optim.rank_energy are set."""
        out = {}
        for group in self.param_groups:
            if group["kind"] != "lowrank":
                continue
            for name, p in zip(group["names"], group["params"]):
                basis = self.state[p].get("basis") if p in self.state else None
                if basis is not None:
                    out[name] = int(basis.shape[1])
        return out

    # ------------------------------------------------------------------------------ save / restore
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore exactly (tensors are copied, dtypes kept); a state of another optimizer is a ValueError."""
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if not isinstance(groups, list) or "state" not in state_dict:
            raise ValueError("not an optimizer state dict (needs 'state' and 'param_groups'); pass "
                             "optimizer.state_dict() output")
        mine = self.param_groups
        if len(groups) != len(mine):
            raise ValueError(f"optimizer state has {len(groups)} param groups, this optimizer "
                             f"({mine[0].get('optim') if mine else '?'}) has {len(mine)}; load a state saved by "
                             f"the same optimizer config")
        for saved, cur in zip(groups, mine):
            for key in _GROUP_CHECK_KEYS:
                if saved.get(key) != cur.get(key):
                    what = "parameter names" if key == "names" else f"{key} {saved.get(key)!r}"
                    raise ValueError(f"optimizer state does not match: saved {what} vs this optimizer's "
                                     f"{'names' if key == 'names' else repr(cur.get(key))} (optimizer "
                                     f"{saved.get('optim')!r} -> {cur.get('optim')!r}); load it into an "
                                     f"optimizer built with the same optim config and parameters")
        params = [p for g in mine for p in g["params"]]
        super().load_state_dict({"state": {}, "param_groups": groups})
        self._reindex()
        self.state.clear()
        for idx, st in state_dict["state"].items():
            idx = int(idx)
            if not 0 <= idx < len(params):
                raise ValueError(f"optimizer state refers to parameter index {idx} of {len(params)}")
            p = params[idx]
            self.state[p] = {k: (v.detach().clone().to(p.device) if torch.is_tensor(v) else v)
                             for k, v in st.items()}
            group = self._groups_of[p]
            if group["kind"] == "lowrank" and self.state[p].get("basis") is not None:
                _check_lowrank_state(self._names[p], p.shape, self.state[p], group)


def _check_lowrank_state(name: str, shape, state: dict, group: dict) -> None:
    """A loaded projected state's shapes fit the parameter: the basis (rows, r) with 1 <= r <= the group's start
    rank (rank schedules save smaller ones), the moments of the matching (m, r) / (r, n) shape; else a ValueError
    now instead of a shape error at the next step."""
    side = proj.choose_side(shape, group["proj_type"])
    rows = shape[1] if side == "right" else shape[0]
    basis = state["basis"]
    r = basis.shape[1] if basis.dim() == 2 else -1
    if basis.dim() != 2 or basis.shape[0] != rows or not 1 <= r <= group["rank"]:
        raise ValueError(f"optimizer state does not match: {name}'s basis has shape {tuple(basis.shape)}, expected "
                         f"({rows}, r) with 1 <= r <= optim.rank {group['rank']}; load a state saved with this "
                         f"model and optim config")
    moment = state.get("state1", state.get("exp_avg"))
    low = (shape[0], r) if side == "right" else (r, shape[1])
    if moment is not None and tuple(moment.shape) != low:
        raise ValueError(f"optimizer state does not match: {name}'s moments have shape {tuple(moment.shape)}, its "
                         f"basis of rank {r} needs {low}; load a state saved with this model and optim config")


def _chunks(params: list, max_numel: int):
    """Consecutive runs of `params` of at most `max_numel` elements (a bigger tensor is a run of its own)."""
    run, used = [], 0
    for p in params:
        if run and used + p.numel() > max_numel:
            yield run
            run, used = [], 0
        run.append(p)
        used += p.numel()
    if run:
        yield run


def make_groups(named_params: Iterable, name: str, cfg, shapes: dict | None = None) -> list[dict]:
    """The param groups of optimizer `name` for these (name, param) pairs (see LowRankAdamW). shapes: name ->
    the shape of the parameter a tensor is a flat slice of (the sharded optimizer's slices), for the grouping."""
    bits = 8 if name.endswith("8bit") else 32
    base = name.removesuffix("8bit")
    shapes = shapes or {}
    pairs = [(n, p) for n, p in named_params if p.requires_grad or n in shapes]
    low = [(n, p) for n, p in pairs if is_projected(n, shapes.get(n, p.shape))]      # the projectable matrices
    rest = [(n, p) for n, p in pairs if not is_projected(n, shapes.get(n, p.shape))]  # embeddings, lm_head, norms
    # Every optimizer has the same two groups, so a comparison can train `rest` identically (same Adam, same
    # lr: optim.other_lr) and differ only in how the matrices are optimized (optim.matrix_lr).
    matrix_lr = getattr(cfg, "matrix_lr", 0.0) or cfg.lr
    other_lr = getattr(cfg, "other_lr", 0.0) or cfg.lr
    other = {"params": [p for _, p in rest], "names": [n for n, _ in rest], "kind": "adam", "optim": name,
             "bits": bits, "lr": other_lr, "base_lr": other_lr}
    if not projects(name):
        return [{"params": [p for _, p in low], "names": [n for n, _ in low], "kind": "adam", "optim": name,
                 "bits": bits, "lr": matrix_lr, "base_lr": matrix_lr}, other]
    for n, p in low:
        proj.check_rank(p.shape, cfg.rank, n)
    return [
        {"params": [p for _, p in low], "names": [n for n, _ in low], "kind": "lowrank", "optim": name,
         "bits": bits, "rank": cfg.rank, "update_proj_gap": cfg.update_proj_gap, "scale": cfg.scale,
         "proj_type": cfg.proj_type, "method": "svd" if base == "galore" else "rsvd",
         "oversampling": cfg.oversampling, "power_iters": cfg.power_iters,
         "moments_on_refresh": cfg.moments_on_refresh, "lr": matrix_lr, "base_lr": matrix_lr,
         # rank schedules and basis storage (docs/design.md, "Rank schedules and basis precision")
         "rank_decay": getattr(cfg, "rank_decay", 1.0), "min_rank": getattr(cfg, "min_rank", 1),
         "rank_energy": getattr(cfg, "rank_energy", 0.0), "basis_dtype": getattr(cfg, "basis_dtype", "float32")},
        other,
    ]
