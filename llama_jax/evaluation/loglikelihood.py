"""Log-likelihood of continuations given contexts, batched and sharded: the scoring behind multiple-choice benchmarks.

Each (context, continuation) pair becomes one row `context + continuation` (truncated from the left to the model's
context), right-padded to a power-of-two length bucket; rows are sorted by length and cut into fixed-size batches,
so one jitted program serves each length bucket. Right padding needs no mask: causal attention never lets a real
position see the padding after it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from llama_jax.inference.generate import MIN_PROMPT_BUCKET, bucket, model_mesh
from llama_jax.model import Llama
from llama_jax.sharding import batch_sharding
from llama_jax.training.loss import chunked_map

Pair = tuple[Sequence[int], Sequence[int]]


def _row_scores(graphdef: nnx.GraphDef, params: nnx.State, inputs: jax.Array, targets: jax.Array,
                weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row: summed log-probability of the weighted targets, and whether each of them is the argmax.

    In sequence chunks, as training's loss (`chunked_map`): batch 8 x 4096 at a 32k vocabulary had 4 GiB of float32
    logits and as much again in their log-softmax."""
    model = nnx.merge(graphdef, params)

    def per_chunk(features: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = model.logits(features)
        return (-optax.softmax_cross_entropy_with_integer_labels(logits, targets),
                jnp.argmax(logits, axis=-1) == targets)

    features, _ = model.features(inputs)
    logprobs, top = chunked_map(per_chunk, (features, targets))
    return jnp.sum(logprobs * weights, axis=-1), jnp.all(top | (weights == 0), axis=-1)


_row_scores_jit = jax.jit(_row_scores)


def _row(context: Sequence[int], continuation: Sequence[int], max_seq_len: int) -> tuple[list[int], int]:
    if not continuation:
        raise ValueError("empty continuation: there is nothing to score; give at least one continuation token")
    if len(continuation) > max_seq_len:
        raise ValueError(f"continuation has {len(continuation)} tokens but the model's context is {max_seq_len}; "
                         "score it in windows (loglikelihood_rolling) instead")
    if not context:
        raise ValueError("empty context: start it with at least the BOS token")
    return (list(context) + list(continuation))[-(max_seq_len + 1):], len(continuation)


def score_continuations(model: Llama, pairs: Sequence[Pair], batch_size: int = 8) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): log P(continuation | context) and whether greedy decoding gives it.

    Contexts must be non-empty (start them with BOS); too-long rows keep their last `max_seq_len + 1` tokens.
    Runs on the mesh the model's parameters live on, batch rows split over its data and fsdp axes.
    """
    rows = [_row(ctx, cont, model.cfg.max_seq_len) for ctx, cont in pairs]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    graphdef, params = nnx.split(model)
    mesh = model_mesh(params)
    results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            length = bucket(len(rows[chunk[0]][0]) - 1, MIN_PROMPT_BUCKET)
            tokens = np.zeros((batch_size, length + 1), np.int32)
            weights = np.zeros((batch_size, length), np.float32)
            for r, i in enumerate(chunk):
                ids, n_cont = rows[i]
                tokens[r, :len(ids)] = ids
                weights[r, len(ids) - 1 - n_cont:len(ids) - 1] = 1.0
            arrays = (tokens[:, :-1], tokens[:, 1:], weights)
            if mesh is not None:
                arrays = tuple(jax.device_put(a, batch_sharding(mesh, a.shape)) for a in arrays)
            logprob, greedy = _row_scores_jit(graphdef, params, *arrays)
            for r, i in enumerate(chunk):
                results[i] = (float(logprob[r]), bool(greedy[r]))
    return results
