"""PPO's KL coefficient β: fixed, or adapted towards a target KL (Ziegler et al. 2019, "Fine-Tuning Language Models
from Human Preferences", section 2.2; TRL's `AdaptiveKLController`).

The adaptive rule moves β by at most 20% of `batch / horizon` per iteration, proportionally to how far the measured
KL per reply is from the target: `β ← β · (1 + clip(KL / target − 1, −0.2, 0.2) · batch / horizon)`. A policy whose
KL overshoots the target so gets a growing penalty, one that stays under it a shrinking one.
"""

from __future__ import annotations

import numpy as np


def next_kl_coef(kl_coef: float, kl: float, target: float | None, batch: int, horizon: int) -> float:
    """β for the next iteration from this iteration's mean KL per reply (`target` None: β stays fixed)."""
    if target is None:
        return kl_coef
    error = float(np.clip(kl / target - 1.0, -0.2, 0.2))
    return kl_coef * (1.0 + error * batch / horizon)
