"""The decoding KV cache, laid out on the active mesh by logical axes like every other array."""

from __future__ import annotations

from dataclasses import replace

import jax
import jax.numpy as jnp

from llama_jax.model import KVCache, Llama
from llama_jax.sharding import constrain

CACHE_AXES = ("layers", "batch", "kv_heads", "cache_seq", "head_dim")


def shard_cache(cache: KVCache) -> KVCache:
    """Constrain keys/values to `CACHE_AXES` (batch over data/fsdp, kv heads over tensor); no-op without a mesh."""
    return cache.map(lambda x, lead: constrain(x, CACHE_AXES[1 - lead:]))


def resize_cache(cache: KVCache, rows: int, start: int, width: int) -> KVCache:
    """The first `rows` rows (new ones empty) and slots [start, start + width) of each, zeros where that leaves the
    old slots (start < 0 grows them on the left); `index` moves along, so each written slot keeps its place."""
    old_rows = (cache.k if cache.stacked else cache.k[0]).shape[cache.stacked]
    fill = ((0, max(0, rows - old_rows)), (0, 0), (max(0, -start), max(0, start + width - cache.slots)), (0, 0))

    def window(x: jax.Array, lead: int) -> jax.Array:
        kept = (slice(rows), slice(None), slice(max(0, start), max(0, start) + width))
        return jnp.pad(x, ((0, 0),) * lead + fill)[(slice(None),) * lead + kept]

    return replace(cache.map(window), index=cache.index - start)


def take_rows(cache: KVCache, rows: jax.Array) -> KVCache:
    """Row `rows[r]` of the cache as row r, for every layer."""
    return shard_cache(cache.map(lambda x, lead: jnp.take(x, rows, axis=lead)))


def init_cache(model: Llama, batch: int, slots: int) -> KVCache:
    """A zeroed cache of `slots` positions per row in the model's compute dtype and layer layout (stacked for
    `scan_layers`), born sharded when called inside jit under `jax.set_mesh`."""
    execution = model.execution
    return shard_cache(KVCache.create(model.cfg, batch, slots, jnp.dtype(execution.dtype), execution.scan_layers))
