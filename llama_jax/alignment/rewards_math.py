"""Reward arithmetic of the Llama 2 paper (section 3.2), as pure functions of arrays: the margin ranking loss of the
reward models, and the combination of a helpfulness and a safety reward model into the reward PPO maximises.

Scores here are a reward model's scalar output; `combine_rewards` expects them squashed to (0, 1) by a sigmoid (the
paper's 0.15 safety threshold is on that scale), and `rlhf_reward` returns `whiten(logit(R_c))`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Margin m(rating) per rating level (significantly better, better, slightly better, negligibly better / unsure).
MARGINS = {"none": (0.0, 0.0, 0.0, 0.0), "small": (1.0, 2 / 3, 1 / 3, 0.0), "large": (3.0, 2.0, 1.0, 0.0)}
SAFETY_THRESHOLD = 0.15
WHITEN_EPS = 1e-8
LOGIT_EPS = 1e-6


def margins(table: str, levels: jax.Array) -> jax.Array:
    """m(rating) for integer rating `levels` (0 = significantly better ... 3 = negligibly better; -1 = unrated, no
    margin) under the margin table `table` ("none", "small" or "large")."""
    if table not in MARGINS:
        raise ValueError(f"margin table '{table}' is not one of {sorted(MARGINS)}")
    values = jnp.asarray(MARGINS[table] + (0.0,), jnp.float32)  # index -1 -> the appended 0
    return values[jnp.where(levels < 0, len(MARGINS[table]), levels)]


def ranking_loss(chosen: jax.Array, rejected: jax.Array, margin: jax.Array | float = 0.0) -> jax.Array:
    """Per-pair `-log σ(r_chosen − r_rejected − m)` (float32), the binary ranking loss with margin."""
    diff = chosen.astype(jnp.float32) - rejected.astype(jnp.float32) - margin
    return -jax.nn.log_sigmoid(diff)


def logit(p: jax.Array, eps: float = LOGIT_EPS) -> jax.Array:
    """`log(p / (1 − p))`, with `p` clipped to [eps, 1 − eps] so scores of exactly 0 or 1 stay finite."""
    p = jnp.clip(p.astype(jnp.float32), eps, 1 - eps)
    return jnp.log(p) - jnp.log1p(-p)


def whiten(x: jax.Array, shift_mean: bool = True) -> jax.Array:
    """`x` scaled to unit variance over all its elements, and shifted to zero mean unless `shift_mean` is False
    (then the mean is kept, as TRL's `whiten` does for advantages)."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x)
    out = (x - mean) * jax.lax.rsqrt(jnp.var(x) + WHITEN_EPS)
    return out if shift_mean else out + mean


def combine_rewards(helpfulness: jax.Array, safety: jax.Array, unsafe_mask: jax.Array,
                    threshold: float = SAFETY_THRESHOLD) -> jax.Array:
    """The paper's R_c: the safety score where the prompt is tagged unsafe or the safety score is below `threshold`
    (a possibly unsafe reply), else the helpfulness score. Scores are in (0, 1)."""
    use_safety = jnp.asarray(unsafe_mask, bool) | (safety < threshold)
    return jnp.where(use_safety, safety, helpfulness)


def rlhf_reward(helpfulness: jax.Array, safety: jax.Array, unsafe_mask: jax.Array) -> jax.Array:
    """`whiten(logit(R_c))`: the reward PPO receives before its KL penalty."""
    return whiten(logit(combine_rewards(helpfulness, safety, unsafe_mask)))
