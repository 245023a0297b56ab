"""Learning-rate schedule as a pure function of the step (GaLore recipe: linear warmup, cosine to a floor)."""
import math


def lr_multiplier(step: int, max_steps: int, warmup_frac: float, min_lr_frac: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup over warmup_frac of the
    run, then cosine decay from 1 to min_lr_frac at max_steps."""
    warmup = int(warmup_frac * max_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_lr_frac + (1.0 - min_lr_frac) * 0.5 * (1.0 + math.cos(math.pi * progress))
