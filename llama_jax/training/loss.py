"""Next-token cross-entropy computed over sequence chunks, so the float32 `[batch, seq, vocab]` logits never exist.

At llama2-7b's vocabulary, batch 4 x 4096 logits are 2 GiB in float32, and their gradient, softmax and the bf16
copy as much again; chunked, only `[batch, chunk, vocab]` is live at a time. Each chunk's logits are recomputed in
the backward pass (`jax.checkpoint`), which costs one extra output-head matmul (~3% of a 7B step's FLOPs).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

LOSS_CHUNK = 1024  # sequence positions per chunk


def chunked_token_losses(project: Callable[[jax.Array], jax.Array], features: jax.Array, targets: jax.Array,
                         chunk: int = LOSS_CHUNK) -> jax.Array:
    """Per-token cross-entropy `[batch, seq]` (float32) of `project(features)` logits against integer `targets`."""
    return chunked_per_token(lambda f, y: optax.softmax_cross_entropy_with_integer_labels(project(f), y), features,
                             targets, chunk)


def chunked_token_entropy(project: Callable[[jax.Array], jax.Array], features: jax.Array,
                          chunk: int = LOSS_CHUNK) -> jax.Array:
    """Per-position entropy `[batch, seq]` (float32) of the `project(features)` next-token distribution."""

    def entropy(f: jax.Array, _: jax.Array) -> jax.Array:
        logp = jax.nn.log_softmax(project(f).astype(jnp.float32), axis=-1)
        return -jnp.sum(jnp.exp(logp) * logp, axis=-1)

    return chunked_per_token(entropy, features, jnp.zeros(features.shape[:2], jnp.int32), chunk)


def chunked_per_token(per_chunk: Callable[[jax.Array, jax.Array], jax.Array], features: jax.Array,
                      targets: jax.Array, chunk: int = LOSS_CHUNK) -> jax.Array:
    """`per_chunk(features, targets) -> [batch, c]` over sequence chunks of `chunk` positions, concatenated; each
    chunk's intermediates (the logits) are recomputed in the backward pass instead of being kept."""
    b, t, d = features.shape
    if t <= chunk:
        return per_chunk(features, targets)
    n = -(-t // chunk)
    pad = n * chunk - t
    f = jnp.pad(features, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
    y = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)
    one = jax.checkpoint(lambda pair: per_chunk(pair[0], pair[1]))
    return jax.lax.map(one, (f, y)).swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
