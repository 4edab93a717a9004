"""Next-token cross-entropy computed over sequence chunks, so the float32 `[batch, seq, vocab]` logits never exist.

At llama2-7b's vocabulary, batch 4 x 4096 logits are 2 GiB in float32, and their gradient, softmax and the bf16
copy as much again; chunked, only `[batch, chunk, vocab]` is live at a time. Each chunk's logits are recomputed in
the backward pass (`jax.checkpoint`), which costs one extra output-head matmul (~3% of a 7B step's FLOPs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

LOSS_CHUNK = 1024  # sequence positions per chunk


def chunked_token_losses(project: Callable[[jax.Array], jax.Array], features: jax.Array, targets: jax.Array,
                         chunk: int = LOSS_CHUNK) -> jax.Array:
    """Per-token cross-entropy `[batch, seq]` (float32) of `project(features)` logits against integer `targets`."""
    return chunked_map(lambda f, y: optax.softmax_cross_entropy_with_integer_labels(project(f), y),
                       (features, targets), chunk)


def chunked_token_entropy(project: Callable[[jax.Array], jax.Array], features: jax.Array,
                          chunk: int = LOSS_CHUNK) -> jax.Array:
    """Per-position entropy `[batch, seq]` (float32) of the `project(features)` next-token distribution."""

    def entropy(f: jax.Array) -> jax.Array:
        logp = jax.nn.log_softmax(project(f).astype(jnp.float32), axis=-1)
        return -jnp.sum(jnp.exp(logp) * logp, axis=-1)

    return chunked_map(entropy, (features,), chunk)


def chunked_map(per_chunk: Callable[..., Any], arrays: tuple[jax.Array, ...], chunk: int = LOSS_CHUNK) -> Any:
    """`per_chunk(*slices) -> [batch, chunk]` (or a tuple of such) over `[batch, seq, ...]` arrays, one sequence
    chunk at a time (each chunk recomputed in the backward pass), concatenated to `[batch, seq]`."""
    b, t = arrays[0].shape[:2]
    if t <= chunk:
        return per_chunk(*arrays)
    n = -(-t // chunk)

    def split(x: jax.Array) -> jax.Array:
        x = jnp.pad(x, [(0, 0), (0, n * chunk - t)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)

    @jax.checkpoint
    def one(slices: tuple[jax.Array, ...]) -> jax.Array:
        return per_chunk(*slices)

    chunks = jax.lax.map(one, tuple(split(x) for x in arrays))
    return jax.tree.map(lambda y: y.swapaxes(0, 1).reshape(b, n * chunk)[:, :t], chunks)
