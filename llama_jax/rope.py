"""Rotary position embedding as Meta's LLaMA applies it: adjacent pairs (2i, 2i+1) of each head rotated by
position * theta^(-2i/head_dim).

A forward pass computes its rotation (cos and sin of every angle, `[batch or 1, seq, 1, head_dim/2]`) once and every
layer applies it to its queries and keys. Positions the model counts itself (`start + 0, 1, ...`) take their rows
from a NumPy table, a constant of the compiled program; positions the caller bounds (`positions_below`: packed
rows, `generate`, the server's prefill) are gathered from it; any others are computed in the program.
The table is a measured choice: XLA:CPU counts float sin and cos as cheap enough to recompute inside each consumer,
so with computed angles every rotary fusion evaluated them once per element of q and k, 16x per (row, position,
frequency) for 8 heads. On a 2-core CPU the table took the README demo's bf16 train step from 314 to 283 ms and the
24M-parameter bench config's from 802 to 736 ms (1,522 to 1,455 in float32; means of two timings each); gathered, a
packed bf16 step from 802 to 754 ms (three each) and bf16 prefill of 16 x 128 tokens from 2,526 to 2,952 tokens/s
(stories110m) and 11,178 to 12,620 (stories15m).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Rotation = tuple[jax.Array, jax.Array]  # cos, sin: [batch or 1, seq, 1, head_dim / 2] float32


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """RoPE frequencies theta^(-2i/head_dim), i < head_dim/2, in float32 arithmetic as Meta and HF compute them."""
    exponents = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
    return np.float32(1.0) / np.float32(theta) ** exponents


@functools.lru_cache(maxsize=32)
def _table(slots: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin `[slots, head_dim/2]` of positions 0 .. slots-1: float32 angles (as `computed_rotation` forms
    them), then cos and sin in float64 rounded to float32 (within 2 ulps of the traced path's, tested)."""
    angles = np.arange(slots, dtype=np.float32)[:, None] * rope_inv_freq(head_dim, theta)
    return (np.cos(angles.astype(np.float64)).astype(np.float32),
            np.sin(angles.astype(np.float64)).astype(np.float32))


def computed_rotation(positions: jax.Array, head_dim: int, theta: float) -> Rotation:
    """The rotation of any `[B, T]` integer positions, computed in the program."""
    angles = positions.astype(jnp.float32)[..., None, None] * rope_inv_freq(head_dim, theta)
    return jnp.cos(angles), jnp.sin(angles)


def table_rotation(start: jax.Array | int, length: int, slots: int, head_dim: int, theta: float) -> Rotation:
    """The rotation of positions `start .. start+length-1` (all rows alike), read from the table of `slots` rows;
    `start + length <= slots` (a KV cache's slots, or the sequence itself)."""
    def rows(table: np.ndarray) -> jax.Array:
        picked = jnp.asarray(table) if length == slots else jax.lax.dynamic_slice_in_dim(table, start, length)
        return picked[None, :, None, :]
    return tuple(rows(t) for t in _table(slots, head_dim, theta))


def gathered_rotation(positions: jax.Array, below: int, head_dim: int, theta: float) -> Rotation:
    """The rotation of `[B, T]` positions known to lie in `[0, below)`, gathered from the table of `below` rows
    (NaN for a position outside it, so a broken bound shows instead of rotating by a clamped row)."""
    return tuple(jnp.take(t, positions, axis=0, mode="fill", fill_value=jnp.nan)[..., None, :]
                 for t in _table(below, head_dim, theta))


def rope(x: jax.Array, rotation: Rotation) -> jax.Array:
    """Rotate `[B, T, heads, head_dim]` by `rotation`.

    Written as `x * cos + swap_pairs(x) * (-sin, sin)`, all elementwise: the same products and sums as splitting the
    pairs and stacking them back, without the stack's copy (and its pad in the backward pass), which took 7% of a
    CPU train step.
    """
    head_dim = x.shape[-1]
    cos = jnp.repeat(rotation[0], 2, axis=-1)
    sin = jnp.repeat(rotation[1], 2, axis=-1) * jnp.tile(jnp.array([-1.0, 1.0], jnp.float32), head_dim // 2)
    xf = x.astype(jnp.float32)
    swapped = xf.reshape(*x.shape[:-1], head_dim // 2, 2)[..., ::-1].reshape(x.shape)
    return (xf * cos + swapped * sin).astype(x.dtype)
