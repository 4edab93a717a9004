"""Structured pruning: remove whole FFN channels and whole KV groups, so the model (and every checkpoint of it) shrinks.

Each layer keeps its own strongest units, scored by the squared L2 norm of every weight that reads or writes them:
an FFN channel j by w1[:, j], w3[:, j] and w2[j, :]; a KV group by its key and value heads plus the `n_rep` query
heads that share them (their wq columns and wo rows). Dropping a unit equals zeroing those weights, so the pruned
model computes exactly what the masked dense model does. Every layer keeps the same count because the architecture
has one `ffn_hidden_dim` and one head count (as HF's `intermediate_size`, Meta's params.json and llama2.c's header
do). Removing KV groups (never single query heads) keeps GQA's `n_heads = n_rep * n_kv_heads`; heads keep their
size, so `head_dim` stops being `dim / n_heads` and is stored explicitly (HF and orbax carry it, Meta's params.json
gets an extra key; llama2.c's header cannot say it and refuses such a model).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax.checkpoints.layout import restack
from llama_jax.model import Llama


def strongest(scores: jax.Array, count: int) -> jax.Array:
    """Indices of the `count` largest scores, in their original order (ties: the lower index wins)."""
    return jnp.sort(jnp.argsort(-scores, stable=True)[:count])


def ffn_channel_scores(ffn: dict[str, jax.Array]) -> jax.Array:
    """`[hidden]` squared L2 norms of each channel's w1 and w3 columns and w2 row (model layout: w1 `[dim, hidden]`)."""
    square = lambda name, axis: jnp.sum(jnp.square(ffn[name].astype(jnp.float32)), axis=axis)  # noqa: E731
    return square("w1", 0) + square("w3", 0) + square("w2", 1)


def kv_group_scores(attention: dict[str, jax.Array], n_rep: int) -> jax.Array:
    """`[n_kv_heads]` squared L2 norms of each KV group: its wk and wv heads and its `n_rep` query heads in wq, wo."""
    square = lambda name, axes: jnp.sum(jnp.square(attention[name].astype(jnp.float32)), axis=axes)  # noqa: E731
    queries = square("wq", (0, 2)) + square("wo", (1, 2))  # [n_heads]
    return square("wk", (0, 2)) + square("wv", (0, 2)) + queries.reshape(-1, n_rep).sum(axis=1)


def _prune_layer(layer: dict[str, Any], ffn_keep: int, kv_keep: int, n_rep: int) -> dict[str, Any]:
    ffn = dict(layer["feed_forward"])
    channels = strongest(ffn_channel_scores(ffn), ffn_keep)
    ffn.update(w1=ffn["w1"][:, channels], w3=ffn["w3"][:, channels], w2=ffn["w2"][channels, :])
    attention = dict(layer["attention"])
    groups = strongest(kv_group_scores(attention, n_rep), kv_keep)
    heads = (groups[:, None] * n_rep + jnp.arange(n_rep)).ravel()  # kv head g serves query heads g*r .. g*r+r-1
    attention.update(wq=attention["wq"][:, heads], wk=attention["wk"][:, groups], wv=attention["wv"][:, groups],
                     wo=attention["wo"][heads])
    return {**layer, "feed_forward": ffn, "attention": attention}


def prune_structured(model: Llama, ffn_hidden_dim: int | None = None, n_kv_heads: int | None = None) -> Llama:
    """A smaller copy of `model` keeping `ffn_hidden_dim` FFN channels and `n_kv_heads` KV groups (with their query
    heads) in every layer; None keeps that part whole."""
    cfg = model.cfg
    ffn_keep = cfg.hidden_dim if ffn_hidden_dim is None else ffn_hidden_dim
    kv_keep = cfg.n_kv_heads if n_kv_heads is None else n_kv_heads
    if not 0 < ffn_keep <= cfg.hidden_dim or not 0 < kv_keep <= cfg.n_kv_heads:
        raise ValueError(f"structured pruning keeps 1..{cfg.hidden_dim} FFN channels and 1..{cfg.n_kv_heads} KV "
                         f"groups; got ffn_hidden_dim={ffn_keep}, n_kv_heads={kv_keep}")
    new_cfg = dataclasses.replace(cfg, ffn_hidden_dim=ffn_keep, n_heads=kv_keep * cfg.n_rep, n_kv_heads=kv_keep,
                                  head_dim=cfg.head_dim)
    stacked = model.execution.scan_layers
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if stacked:
        state = restack(state, cfg.n_layers, stacked=False)
    state["layers"] = {i: _prune_layer(layer, ffn_keep, kv_keep, cfg.n_rep) for i, layer in state["layers"].items()}
    if stacked:
        state = restack(state, cfg.n_layers, stacked=True)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Llama(new_cfg, model.execution, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(abstract, state)
    return nnx.merge(graphdef, abstract)
