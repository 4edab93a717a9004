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
        logits = drop_outside_top_p(logits, sampling.top_p)
    return logits


# Where the nucleus lies: the candidates' partial sums decide it whenever they pass p. On a 2-core AMD EPYC, XLA:CPU
# sorted 16 x 32,000 logits in 115 ms (4x a stories15m decode step at that batch); `lax.top_k` took 2.5 ms for 256
# candidates, 6.5 ms for 1,024 (a nucleus of up to 1,024 tokens, 431 at most in the rows of spread 4).
NUCLEUS_CANDIDATES = 1024


def drop_outside_top_p(logits: jax.Array, top_p: jax.Array | float,
                       candidates: int = NUCLEUS_CANDIDATES) -> jax.Array:
    """Set to -inf every token outside the nucleus of mass `top_p` (a float, or one per row as `[..., 1]`).

    Meta's rule on the most likely `candidates` tokens: when they hold more than p of every row's mass, the
    ones after them are dropped anyway, and the rest of the vocabulary is left unsorted (a trained model's nucleus is
    a few dozen tokens, a flat row's can be most of the vocabulary: then the whole vocabulary is sorted). Tokens tied
    with the last kept one are kept too.
    """
    active = jnp.asarray(top_p) < 1.0

    def nucleus() -> jax.Array:
        probs = jax.nn.softmax(logits, axis=-1)
        top_logits, top_index = jax.lax.top_k(logits, min(candidates, logits.shape[-1]))
        top_probs = jnp.take_along_axis(probs, top_index, axis=-1)
        covered = jnp.all(~active | (jnp.sum(top_probs, axis=-1, keepdims=True) > top_p))

        def by_sorting() -> jax.Array:
            order = jnp.argsort(-logits, axis=-1)
            return _least_kept(jnp.take_along_axis(logits, order, axis=-1), jnp.take_along_axis(probs, order, axis=-1),
                               top_p)

        least = jax.lax.cond(covered, lambda: _least_kept(top_logits, top_probs, top_p), by_sorting)
        return jnp.where(active & (logits < least), -jnp.inf, logits)

    return jax.lax.cond(jnp.any(active), nucleus, lambda: logits)  # a server batch of top_p 1 rows: nothing to do


def _least_kept(sorted_logits: jax.Array, sorted_probs: jax.Array, top_p: jax.Array | float) -> jax.Array:
    """The least logit the nucleus keeps, from logits sorted descending and their probabilities (Meta's rule: a
    token stays while the mass before it is at most p)."""
    kept = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs <= top_p
    return jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)


def greedy(logits: jax.Array) -> jax.Array:
    """The first index of each row's largest logit, as `jnp.argmax`, in two plain reductions (a max, then the
    smallest index holding it), which XLA:CPU vectorises; its fused (value, index) argmax took 0.8 ms per
    stories15m batch-16 step."""
    best = jnp.max(logits, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.min(jnp.where(logits == best, index, logits.shape[-1] - 1), axis=-1)


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """Draw one token id per row of `[batch, vocab]` logits."""
    if sampling.greedy:
        return greedy(logits)
    filtered = filter_logits(logits, sampling)
    return draw(filtered, jax.random.uniform(key, (filtered.shape[0], 1)))


def sample_rows(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """One token per row of `[batch, vocab]` logits, each row with its own temperature, top_p and PRNG key (a
    continuously batched server mixes requests): argmax where temperature is 0, as `sample` does."""
    scaled = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    uniform = jax.vmap(lambda key: jax.random.uniform(key, (1,)))(keys)
    drawn = draw(drop_outside_top_p(scaled, top_p[:, None]), uniform)
    return jnp.where(temperature > 0, drawn, greedy(logits)).astype(jnp.int32)


# Tokens per block of `draw`'s two-level search. On a 2-core AMD EPYC, 16 x 32,000 logits: `jax.random.categorical`
# (a Gumbel noise per vocabulary entry; its random bits alone 2.9 ms) took 7.3-8.7 ms, more than half a stories15m
# decode step at that batch; `draw` 0.4 ms (one uniform per row; a flat cumulative sum over the vocabulary 1.7 ms).
DRAW_BLOCK = 128


def draw(logits: jax.Array, uniform: jax.Array) -> jax.Array:
    """Sample each row of `[batch, vocab]` logits (-inf = never) by inverting its cumulative distribution at
    `uniform` (`[batch, 1]` in [0, 1)): the block of DRAW_BLOCK tokens whose cumulative mass passes u x total, then
    the token inside it. The same distribution as `jax.random.categorical`, from one random number per row instead of
    one per token; both resolve probabilities to about 1e-7 (float32 uniforms, Gumbel noise)."""
    batch, vocab = logits.shape
    blocks = -(-vocab // DRAW_BLOCK)
    padded = jnp.pad(logits, ((0, 0), (0, blocks * DRAW_BLOCK - vocab)), constant_values=-jnp.inf)
    weights = jnp.exp(padded - jnp.max(logits, axis=-1, keepdims=True)).reshape(batch, blocks, DRAW_BLOCK)
    block_mass = jnp.sum(weights, axis=-1)
    mass_through = jnp.cumsum(block_mass, axis=-1)
    target = uniform * mass_through[:, -1:]
    block = _interval(mass_through, block_mass, target)
    mass_before = jnp.take_along_axis(mass_through - block_mass, block[:, None], axis=-1)
    inside = jnp.take_along_axis(weights, block[:, None, None], axis=1)[:, 0]
    token = _interval(jnp.cumsum(inside, axis=-1), inside, target - mass_before)
    return (block * DRAW_BLOCK + token).astype(jnp.int32)


def _interval(mass_through: jax.Array, mass: jax.Array, target: jax.Array) -> jax.Array:
    """Per row, the first entry whose inclusive cumulative mass exceeds `target`, kept among the entries with mass
    (float rounding of the partial sums may point just past the last one or, inside a block, before the first)."""
    index = jax.lax.broadcasted_iota(jnp.int32, mass.shape, mass.ndim - 1)
    first = jnp.min(jnp.where(mass > 0, index, mass.shape[-1] - 1), axis=-1)
    last = jnp.max(jnp.where(mass > 0, index, 0), axis=-1)
    return jnp.clip(jnp.sum(mass_through <= target, axis=-1, dtype=jnp.int32), first, last)
