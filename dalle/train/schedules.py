"""Learning-rate and annealing schedules as pure functions of the step (resuming needs nothing but the
step)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from dalle.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    pass


def cosine_schedule(step: float, total: float, start: float, end: float) -> float:
    """Cosine from ``start`` (step 0) to ``end`` (step ``total``), then held at ``end``."""
    if total <= 0 or step >= total:
        return float(end)
    frac = max(step, 0) / total
    return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac)))


def warmup_lr(
    step: float, base_lr: float, warmup: int, total: int, min_lr: float, decay: str = "cosine"
) -> float:
    """Linear warm-up over ``warmup`` steps to ``base_lr``, then ``decay`` ("cosine", "linear", "constant")
    down to ``min_lr`` at ``total``."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if decay == "constant":
        return base_lr
    span = max(total - warmup, 1)
    frac = min(max(step - warmup, 0) / span, 1.0)
    if decay == "linear":
        return base_lr + (min_lr - base_lr) * frac
    if decay == "cosine":
        return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ConfigError(f"unknown learning-rate decay {decay!r}: use cosine, linear or constant")
