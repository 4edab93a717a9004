"""One row's KV cache kept from one generation to the next, so a prompt that begins with tokens already run (a chat's
history: the last prompt and the reply to it) computes only what it adds, as vLLM's prefix caching and HF's reused
`past_key_values` do. `chat` passes one to every turn; without it each turn ran its whole dialog again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax.chat import common_prefix
from llama_jax.inference.cache import init_cache, resize_cache, shard_cache
from llama_jax.inference.generate import MIN_PROMPT_BUCKET, DecodeState, bucket, first_state
from llama_jax.inference.sampling import Sampling
from llama_jax.model import KVCache, Llama


def reusable(held: Sequence[int], prompt: Sequence[int]) -> int:
    """How many leading ids of `prompt` are `held`, short of its last (which must run: its logits sample)."""
    return min(common_prefix(held, prompt), len(prompt) - 1)


def _extend(graphdef: nnx.GraphDef, params: Any, cache: KVCache | None, tokens: jax.Array, start: jax.Array,
            n: jax.Array, key: jax.Array, eos_id: jax.Array, sampling: Sampling, slots: int, n_out: int
            ) -> DecodeState:
    """Run `tokens[0, :n]` (right-padded to a bucket) at slots `start ..` of a cache that holds the `start` tokens
    before them (None: nothing, a prefill from slot 0 into a new cache of `slots`), and sample the first new token.

    The padding's keys and values land after the real ones, where causality hides them until decoding overwrites
    them; its positions are clamped into the context so they stay finite. A fresh prefill keeps the padding in a
    segment of its own, so its prompt attends among itself through the attention kernels (as `prefill_padded`); a
    continuation attends to the cache's slots. Either way only position `n - 1` goes through the output head.
    """
    model: Llama = nnx.merge(graphdef, params)
    t = tokens.shape[1]
    below = model.cfg.max_seq_len
    positions = jnp.minimum(start + jnp.arange(t), below - 1)[None]
    if cache is None:
        segments = (jnp.arange(t) < n).astype(jnp.int32)[None]
        features, cache = model.features(tokens, positions, cache=init_cache(model, 1, slots), segment_ids=segments,
                                         positions_below=below)
    else:
        features, cache = model.features(tokens, positions, cache=KVCache(cache.k, cache.v, start),
                                         positions_below=below)
    logits = model.logits(jax.lax.dynamic_slice_in_dim(features, n - 1, 1, axis=1))[:, 0]
    cache = shard_cache(KVCache(cache.k, cache.v, start + n))
    return first_state(cache, logits, jnp.zeros((1,), jnp.int32), key, eos_id, sampling, n_out)


def _grow(cache: KVCache, slots: int) -> KVCache:
    """The cache with empty slots appended up to `slots` (a dialog that outgrew its bucket: copied once)."""
    return shard_cache(resize_cache(cache, 1, 0, slots))


extend_jit = jax.jit(_extend, static_argnames=("sampling", "slots", "n_out"), donate_argnames=("cache",))
grow_jit = jax.jit(_grow, static_argnames=("slots",))


class PrefixCache:
    """The KV cache of one row and the token ids it holds, for `generate(..., prefix_cache=)` to continue from.

    A call reuses the longest common prefix of its prompt and the ids held (at least one prompt token always runs:
    its logits give the first new token), writes the rest behind it, and keeps the cache with its prompt and every
    generated token but the last (which was sampled, never fed back). Ids that differ from what was held (a reply
    re-encoded differently, history dropped from the front) are simply run again from there.
    """

    def __init__(self) -> None:
        self.cache: KVCache | None = None
        self.ids: list[int] = []
        self.model: tuple[Any, ...] | None = None  # the config and execution of the model whose cache it holds

    def reusable(self, prompt: Sequence[int]) -> int:
        """How many leading ids of `prompt` the cache already holds (at most all but its last)."""
        return reusable(self.ids, prompt)

    def prefill(self, model: Llama, prompt: Sequence[int], key: jax.Array, eos_id: jax.Array, sampling: Sampling,
                max_new: int, n_out: int) -> DecodeState:
        """The decode state after running what `prompt` adds to the ids held (the cache passes to the state)."""
        if self.model not in (None, (model.cfg, model.execution)):
            raise ValueError("this PrefixCache holds another model's KV cache; use a new PrefixCache() for each model")
        graphdef, params = nnx.split(model)
        start = self.reusable(prompt)
        rest = list(prompt[start:])
        width = bucket(len(rest), MIN_PROMPT_BUCKET)
        slots = bucket(max(start + width, len(prompt) + max_new), MIN_PROMPT_BUCKET)
        cache = self.cache if start else None
        if cache is not None and cache.slots < slots:
            cache = grow_jit(cache, slots=slots)
        slots = cache.slots if cache is not None else slots
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :len(rest)] = rest
        self.cache, self.ids, self.model = None, [], (model.cfg, model.execution)  # `keep` restores the cache
        return extend_jit(graphdef, params, cache, tokens, jnp.int32(start), jnp.int32(len(rest)), key, eos_id,
                          sampling=sampling, slots=slots, n_out=n_out)

    def keep(self, prompt: Sequence[int], state: DecodeState) -> None:
        """Hold the finished state's cache: `prompt` and the generated ids fed back after it."""
        fed = int(state.cache.index) - len(prompt)
        self.cache, self.ids = state.cache, list(prompt) + np.asarray(state.out[0, :fed]).tolist()
