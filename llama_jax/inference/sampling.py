"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus), applied in that order.

Settings are static (a frozen, hashable `Sampling`), so a jitted decode loop specialises once per setting and the
unused filters cost nothing. Top-p follows Meta's `sample_top_p`: sort the probabilities, drop every token whose
preceding cumulative mass already exceeds p (so the kept prefix is the smallest one whose mass reaches p), renormalise.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy (argmax); top_k 0 = off; top_p 1.0 = off."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """Temperature-scaled float32 logits with tokens outside top-k / top-p set to -inf (last axis = vocab)."""
    logits = logits.astype(jnp.float32) / sampling.temperature
    vocab = logits.shape[-1]
    if 0 < sampling.top_k < vocab:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_probs = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), order, axis=-1)
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        drop_sorted = mass_before > sampling.top_p
        drop = jnp.put_along_axis(jnp.zeros_like(drop_sorted), order, drop_sorted, axis=-1, inplace=False)
        logits = jnp.where(drop, -jnp.inf, logits)
    return logits


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """Draw one token id per row of `[batch, vocab]` logits."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, sampling), axis=-1).astype(jnp.int32)
