"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus), applied in that order.

Settings are static (a frozen, hashable `Sampling`), so a jitted decode loop specialises once per setting and the
unused filters cost nothing. Top-p follows Meta's `sample_top_p`: drop every token whose more likely tokens already
hold more than p of the mass (so the kept prefix is the smallest one whose mass reaches p), renormalise.
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


# Halvings that find the least kept probability: every float32 in [0, 1] has a bit pattern below 2**30 (1.0 is
# 0x3F800000). On a 2-core AMD EPYC, 16 x 32,000 logits: 2.1-2.7 ms whatever the nucleus's size; sorting the
# vocabulary took 98-118 ms, and the 1,024 most likely tokens (`lax.top_k`, enough for peaked rows only) 6.5-6.7 ms.
_HALVINGS = 30


def drop_outside_top_p(logits: jax.Array, top_p: jax.Array | float) -> jax.Array:
    """Set to -inf every token outside the nucleus of mass `top_p` (a float, or one per row as `[..., 1]`).

    Meta's rule without sorting: a token stays when the tokens more likely than it hold at most p of the row's mass
    (so tokens tied with the last one kept stay too). That mass only grows as the probability falls, so the least
    probability kept is found by halving an interval of float32 bit patterns (non-negative floats order as their
    bits), one masked sum over the row per halving: exact, and the same cost for a peaked row's nucleus of a few
    tokens as for a flat row's of most of the vocabulary.
    """
    active = jnp.asarray(top_p) < 1.0

    def nucleus() -> jax.Array:
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        bits = jax.lax.bitcast_convert_type(probs, jnp.int32)

        def halve(_: int, bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            low, high = bounds  # the least kept probability's bits lie in [low, high]
            middle = low + (high - low) // 2
            fits = jnp.sum(jnp.where(bits > middle, probs, 0.0), axis=-1, keepdims=True) <= top_p
            return jnp.where(fits, low, middle + 1), jnp.where(fits, middle, high)

        highest = jnp.max(bits, axis=-1, keepdims=True)  # nothing is more likely than the top token: it always stays
        _, least = jax.lax.fori_loop(0, _HALVINGS, halve, (jnp.zeros_like(highest), highest))
        return jnp.where(active & (bits < least), -jnp.inf, logits)

    return jax.lax.cond(jnp.any(active), nucleus, lambda: logits)  # a server batch of top_p 1 rows: nothing to do


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
    return jnp.where(temperature > 0, drawn, greedy(logits))


# Tokens per block of `draw`'s two-level search. On a 2-core AMD EPYC, 16 x 32,000 logits: `jax.random.categorical`
# (a Gumbel noise per vocabulary entry; its random bits alone 2.9 ms) took 5.0-8.7 ms, more than half a stories15m
# decode step at that batch; `draw` 0.3-0.5 ms (one uniform per row; a flat cumulative sum over the vocabulary 1.7 ms).
DRAW_BLOCK = 128


def draw(logits: jax.Array, uniform: jax.Array) -> jax.Array:
    """Sample each row of `[batch, vocab]` logits (-inf = never) by inverting its cumulative distribution at
    `uniform` (`[batch, 1]` in [0, 1)): the block of DRAW_BLOCK tokens whose cumulative mass passes u x total, then
    the token inside it. The same distribution as `jax.random.categorical`, from one random number per row instead of
    one per token; both resolve probabilities to about 1e-7 (float32 uniforms, Gumbel noise)."""
    batch, vocab = logits.shape
    blocks = -(-vocab // DRAW_BLOCK)
    padded = jnp.pad(logits.astype(jnp.float32), ((0, 0), (0, blocks * DRAW_BLOCK - vocab)), constant_values=-jnp.inf)
    weights = jnp.exp(padded - jnp.max(padded, axis=-1, keepdims=True)).reshape(batch, blocks, DRAW_BLOCK)
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
