"""The decoding KV cache, laid out on the active mesh by logical axes like every other array."""

from __future__ import annotations

import jax.numpy as jnp

from llama_jax.config import LlamaConfig
from llama_jax.model import KVCache
from llama_jax.sharding import constrain

CACHE_AXES = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")


def shard_cache(cache: KVCache) -> KVCache:
    """Constrain keys/values to `CACHE_AXES` (batch over data/fsdp, kv heads over tensor); no-op without a mesh."""
    return KVCache(constrain(cache.k, CACHE_AXES), constrain(cache.v, CACHE_AXES), cache.index)


def init_cache(cfg: LlamaConfig, batch: int, slots: int, dtype: str) -> KVCache:
    """A zeroed `dtype` cache of `slots` positions per row, born sharded when called inside jit under
    `jax.set_mesh`."""
    return shard_cache(KVCache.create(cfg, batch, slots, jnp.dtype(dtype)))
