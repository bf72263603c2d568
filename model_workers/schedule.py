"""Learning-rate schedules as pure functions (DESIGN §3.1 step 8).

Dense parameters follow linear warmup then cosine decay to ``min_lr_ratio * base_lr``; the memory
values additionally get a multiplier that decays linearly from ``value_lr_mult`` (4x) to
``value_lr_mult_final`` (1x), the paper's single biggest ablation gain ("value LR decay"), or, with
``value_lr_schedule = "constant"``, stays at ``value_lr_mult`` (UltraMemV2's choice for long runs).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - typing only
    from model_workers.ultramem import MemoryConfig


def lr_at(
    step: int, *, base_lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1
) -> float:
    """The dense learning rate at ``step`` (0-based): warmup, cosine decay, then a floor.

    Phase 1 (step < warmup_steps): linear from base_lr/warmup_steps up to base_lr.
    Phase 2 (warmup_steps <= step <= max_steps): cosine from base_lr down to min_lr_ratio * base_lr.
    Phase 3 (step > max_steps): stays at min_lr_ratio * base_lr.
    """
    if base_lr < 0 or warmup_steps < 0 or max_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(
            f"lr_at: need base_lr >= 0, warmup_steps >= 0, max_steps >= 0, 0 <= min_lr_ratio <= 1 "
            f"(got {base_lr}, {warmup_steps}, {max_steps}, {min_lr_ratio})"
        )
    min_lr = base_lr * min_lr_ratio
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if step >= max_steps or max_steps <= warmup_steps:
        return min_lr
    progress = (step - warmup_steps) / (max_steps - warmup_steps)  # in [0, 1)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (base_lr - min_lr)


def value_lr_multiplier(step: int, cfg: MemoryConfig, max_steps: int | None) -> float:
    """The value-table LR multiplier at ``step``: linear from cfg.value_lr_mult to value_lr_mult_final,
    or cfg.value_lr_mult at every step with value_lr_schedule = "constant" (UltraMemV2, DESIGN §3.3).

    The decay spans ``cfg.value_lr_decay_steps`` steps, or ``max_steps`` (the run's length) when that
    field is None; after it the multiplier stays at the final value. Equal start and final values give
    a constant multiplier (the ablation rows before "value LR decay").
    """
    assert cfg.value_lr_mult is not None  # resolved by MemoryConfig.__post_init__
    if cfg.value_lr_schedule == "constant":
        return float(cfg.value_lr_mult)
    start, final = cfg.value_lr_mult, cfg.value_lr_mult_final
    span = cfg.value_lr_decay_steps if cfg.value_lr_decay_steps is not None else max_steps
    if start == final:
        return float(start)
    if span is None:
        raise ValueError("value_lr_multiplier: memory.value_lr_decay_steps is None, so max_steps is required")
    if span <= 0:
        return float(final)
    frac = min(max(step, 0) / span, 1.0)
    return float(start + (final - start) * frac)
