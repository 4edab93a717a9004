"""Magnitude and N:M pruning masks for the block projections, and the optax transform that keeps them fixed.

Only the seven block projections are pruned (as Wanda and SparseGPT do): embeddings, the output head and the norm
gains stay dense. A mask is a State shaped like the parameters holding booleans (True = kept; all True outside the
projections), so it shards, checkpoints and restacks exactly like the parameters, at one byte per parameter. N:M
groups run along each matrix's input dimension (in Meta's `(out, in)` rows: M consecutive columns), the layout
sparse tensor cores accelerate.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from llama_jax.config import ConfigError, PruneConfig
from llama_jax.lora import INPUT_DIMS

PRUNED = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
MAX_GLOBAL = 2**31 - 1  # the global ranking counts weights in int32


def keep_largest(magnitudes: jax.Array, sparsity: float) -> jax.Array:
    """True for all but the `round(sparsity * size)` smallest entries; equal magnitudes go in index order."""
    flat = magnitudes.ravel()
    pruned = round(sparsity * flat.size)
    order = jnp.argsort(flat, stable=True)
    ranks = jnp.zeros(flat.size, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
    return (ranks >= pruned).reshape(magnitudes.shape)


def keep_n_of_m(magnitudes: jax.Array, n: int, m: int) -> jax.Array:
    """For an `[in, out]` matrix: True for the `n` largest of every `m` consecutive inputs of each output."""
    rows, cols = magnitudes.shape
    if rows % m:
        raise ConfigError(f"an input dimension of {rows} does not split into groups of {m}; choose another N:M")
    groups = magnitudes.reshape(rows // m, m, cols)
    ranks = jnp.argsort(jnp.argsort(-groups, axis=1, stable=True), axis=1, stable=True)
    return (ranks < n).reshape(rows, cols)


def as_matrices(var: nnx.Variable, leaf: str) -> jax.Array:
    """A projection's value as `[layers, in, out]`: one layer, or all of them when stacked for `lax.scan` (its
    `axes` metadata then starts with `layers`)."""
    value = var.get_value()
    stacked = (var.get_metadata().get("axes") or (None,))[0] == "layers"
    inner = value.shape[1:] if stacked else value.shape
    in_dims = INPUT_DIMS.get(leaf, 1)
    return value.reshape(value.shape[0] if stacked else 1, math.prod(inner[:in_dims]), math.prod(inner[in_dims:]))


def projections(params: Any) -> list[tuple[tuple[Any, ...], nnx.Variable]]:
    """(path, Variable) of every pruned block projection in a `Llama` parameter State."""
    return [(path, var) for path, var in nnx.to_flat_state(params) if path[-1] in PRUNED]


def pruning_masks(params: Any, cfg: PruneConfig) -> Any:
    """The keep-mask of `params` (an nnx State of a `Llama`, layers stacked or not) for `cfg.method`."""
    if not cfg.masks_weights:
        raise ConfigError(f"prune.method '{cfg.method}' makes no mask; use magnitude or an N:M pattern such as 2:4")
    targets = projections(params)
    magnitudes = [jnp.abs(as_matrices(var, path[-1]).astype(jnp.float32)) for path, var in targets]
    if cfg.n_of_m is not None:
        kept = [jax.vmap(lambda x: keep_n_of_m(x, *cfg.n_of_m))(mag) for mag in magnitudes]
    elif cfg.scope == "layer":
        kept = [jax.vmap(lambda x: keep_largest(x, cfg.sparsity))(mag) for mag in magnitudes]
    else:
        total = sum(mag.size for mag in magnitudes)
        if total > MAX_GLOBAL:
            raise ConfigError(f"prune.scope=global ranks all {total:,} projection weights at once (at most "
                              f"{MAX_GLOBAL:,}); use prune.scope=layer")
        joined = keep_largest(jnp.concatenate([mag.ravel() for mag in magnitudes]), cfg.sparsity)
        kept = jnp.split(joined, list(itertools.accumulate(mag.size for mag in magnitudes))[:-1])
    by_path = {path: mask.reshape(var.get_value().shape) for (path, var), mask in zip(targets, kept)}
    flat = [(path, var.replace(by_path.get(path, jnp.ones(var.get_value().shape, bool))))
            for path, var in nnx.to_flat_state(params)]
    return nnx.from_flat_state(flat)


def apply_masks(tree: Any, masks: Any) -> Any:
    """`tree` (parameters or updates) with every masked-out entry set to zero."""
    return jax.tree.map(lambda x, keep: jnp.where(keep, x, jnp.zeros_like(x)), tree, masks)


def projection_sparsity(params: Any) -> float:
    """Fraction of the block projections' weights that are exactly zero."""
    values = [np.asarray(jax.device_get(var.get_value())) for _, var in projections(params)]
    return sum(v.size - np.count_nonzero(v) for v in values) / sum(v.size for v in values)


class MaskState(NamedTuple):
    masks: Any


def keep_pruned(cfg: PruneConfig) -> optax.GradientTransformation:
    """Zero the gradients of pruned weights, first in the chain: clipping, Adam's moments and weight decay then never
    see them, so their updates are exactly zero and the weights stay zero. The mask is computed once, by `init`,
    from the initial weights and lives in the optimizer state (so every checkpoint saves it and resume restores it).
    """
    def init(params: Any) -> MaskState:
        return MaskState(pruning_masks(params, cfg))

    def update(updates: Any, state: MaskState, params: Any = None) -> tuple[Any, MaskState]:
        del params
        return apply_masks(updates, state.masks), state

    return optax.GradientTransformation(init, update)


def masks_of(opt_state: Any) -> Any:
    """The masks held in an optimizer state built with `keep_pruned`."""
    return optax.tree_utils.tree_get(opt_state, "masks")
