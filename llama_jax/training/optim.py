"""AdamW with warmup + cosine decay, global-norm clipping, a weight-decay mask and gradient accumulation.

The recipe is the Llama 2 paper's (β 0.9/0.95, eps 1e-5, decay 0.1, clip 1.0, cosine to 10% of peak). Weight decay
applies to matrices (embeddings included) and never to norm gains. Accumulation sums gradients of *summed* losses over
microbatches and divides once by the total token count, so it equals the big-batch gradient up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from llama_jax.config import ConfigError, OptimConfig

GradFn = Callable[[Any, Any], tuple[tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]], Any]]


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `cfg.lr`, then cosine down to `cfg.lr * cfg.min_lr_ratio` at `total_steps`."""
    if total_steps <= 0:
        raise ConfigError(f"train.steps must be positive, got {total_steps}")
    warmup = min(cfg.warmup_steps, total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio)


def decay_mask(params: Any) -> Any:
    """True for matrices (ndim >= 2: projections and embeddings), False for vectors (RMSNorm gains)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax chain (clip, then AdamW with the masked decay) and its learning-rate schedule."""
    if cfg.grad_accum_steps < 1:
        raise ConfigError(f"optim.grad_accum_steps must be >= 1, got {cfg.grad_accum_steps}")
    schedule = lr_schedule(cfg, total_steps)
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask),
    )
    return tx, schedule


def accumulate_gradients(grad_fn: GradFn, params: Any, batch: dict[str, jax.Array], steps: int
                         ) -> tuple[Any, jax.Array, jax.Array, dict[str, jax.Array]]:
    """Mean-per-unit gradient over `steps` microbatches of `batch`; returns (grads, loss_sum, count, sums).

    `grad_fn(params, microbatch) -> ((loss_sum, (count, sums)), grads_of_loss_sum)`, where `count` is how many units
    (tokens, pairs) the loss sums over and `sums` a dict of further per-unit metric sums, added up like the loss.
    Microbatch i takes rows i, i+steps, ... so each device's contiguous shard of the batch splits locally.
    """
    if steps == 1:
        (loss_sum, (count, sums)), grads = grad_fn(params, batch)
    else:
        def split(x: jax.Array) -> jax.Array:
            if x.shape[0] % steps:
                raise ConfigError(f"batch size {x.shape[0]} is not divisible by optim.grad_accum_steps={steps}")
            return jnp.swapaxes(x.reshape(x.shape[0] // steps, steps, *x.shape[1:]), 0, 1)

        def body(carry: tuple[Any, jax.Array, Any], micro: dict[str, jax.Array]) -> tuple[Any, None]:
            grads, loss_sum, aux = carry
            (m_loss, m_aux), m_grads = grad_fn(params, micro)
            return (jax.tree.map(jnp.add, grads, m_grads), loss_sum + m_loss, jax.tree.map(jnp.add, aux, m_aux)), None

        micros = jax.tree.map(split, batch)
        aux_shape = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micros))[0][1]
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        init = (zeros, jnp.zeros((), jnp.float32), jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shape))
        (grads, loss_sum, (count, sums)), _ = jax.lax.scan(body, init, micros)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
    return grads, loss_sum, count, sums
