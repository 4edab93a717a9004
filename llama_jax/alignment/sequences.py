"""Per-sequence quantities of many (prompt, completion) sequences in jitted batches: completion log-probabilities
(DPO's reference, KL estimates) and rewards (`reward.RewardModel.score`).

Rows are right-padded `ids` with `learn` flags on the completion and each sequence's `length`
(`preferences.sequence_rows`). Widths are rounded up to powers of two and the last batch is filled with empty rows, so
a whole data set compiles once or twice; on a mesh each batch is split over the data and fsdp axes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from llama_jax.alignment.preferences import sequence_rows
from llama_jax.inference.generate import bucket, model_mesh
from llama_jax.model import Llama
from llama_jax.sharding import batch_sharding
from llama_jax.training.loss import chunked_token_losses

BATCH = 64
MIN_WIDTH = 16
SequenceFn = Callable[[Llama, dict[str, jax.Array]], jax.Array]


def completion_logps(model: Llama, ids: jax.Array, learn: jax.Array) -> jax.Array:
    """`[B]` float32 sums of log π(token | earlier tokens) over the tokens flagged by `learn` (`[B, T]`, right-padded
    rows); the first token of a row is never scored (nothing predicts it)."""
    features, _ = model.features(ids)
    targets = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
    weights = jnp.concatenate([learn[:, 1:], jnp.zeros_like(learn[:, :1])], axis=1).astype(jnp.float32)
    return -jnp.sum(chunked_token_losses(model.logits, features, targets) * weights, axis=1)


def logps_of_rows(model: Llama, rows: dict[str, jax.Array]) -> jax.Array:
    return completion_logps(model, rows["ids"], rows["learn"])


def _apply(fn: SequenceFn, graphdef: nnx.GraphDef, params: Any, rows: dict[str, jax.Array]) -> jax.Array:
    return fn(nnx.merge(graphdef, params), rows)


_apply_jit = jax.jit(_apply, static_argnums=0)


def per_sequence(fn: SequenceFn, model: Llama, rows: dict[str, np.ndarray], mesh: Mesh | None = None,
                 batch_size: int = BATCH) -> np.ndarray:
    """`fn(model, batch_rows) -> [B]` over all rows (`ids`, `learn`, `length`, `[N, T]` / `[N]`), in batches."""
    n, width = rows["ids"].shape
    width = bucket(width, MIN_WIDTH)
    size = batch_size if n > batch_size else bucket(n, 1)
    total = -(-n // size) * size
    padded = {k: np.pad(v, [(0, total - n)] + [(0, width - d) for d in v.shape[1:]]) for k, v in rows.items()}
    if "length" in padded:
        padded["length"][n:] = 1  # empty rows read position 0
    graphdef, params = nnx.split(model)
    mesh = mesh or model_mesh(params)
    out = []
    for start in range(0, total, size):
        batch = {k: v[start:start + size] for k, v in padded.items()}
        if mesh is None:
            out.append(_apply_jit(fn, graphdef, params, batch))
            continue
        batch = {k: jax.device_put(v, batch_sharding(mesh, v.shape)) for k, v in batch.items()}
        with jax.set_mesh(mesh):
            out.append(_apply_jit(fn, graphdef, params, batch))
    return np.concatenate([np.asarray(x) for x in out])[:n]


def sequence_logps(model: Llama, prompts_tokens: Sequence[Sequence[int]],
                   completions_tokens: Sequence[Sequence[int]], mesh: Mesh | None = None) -> np.ndarray:
    """`[N]` log-probabilities of each completion given its prompt under `model` (the prompt's first token, BOS,
    is context only)."""
    return per_sequence(logps_of_rows, model, sequence_rows(prompts_tokens, completions_tokens), mesh)
