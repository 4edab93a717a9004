"""The decoding KV cache, laid out on the active mesh by logical axes like every other array."""

from __future__ import annotations

import jax.numpy as jnp

from llama_jax.model import KVCache, Llama
from llama_jax.sharding import constrain

CACHE_AXES = ("layers", "batch", "kv_heads", "cache_seq", "head_dim")


def shard_cache(cache: KVCache) -> KVCache:
    """Constrain keys/values to `CACHE_AXES` (batch over data/fsdp, kv heads over tensor); no-op without a mesh."""
    return cache.map(lambda x, lead: constrain(x, CACHE_AXES[1 - lead:]))


def init_cache(model: Llama, batch: int, slots: int) -> KVCache:
    """A zeroed cache of `slots` positions per row in the model's compute dtype and layer layout (stacked for
    `scan_layers`), born sharded when called inside jit under `jax.set_mesh`."""
    execution = model.execution
    return shard_cache(KVCache.create(model.cfg, batch, slots, jnp.dtype(execution.dtype), execution.scan_layers))
