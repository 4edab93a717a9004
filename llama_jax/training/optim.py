"""AdamW with warmup + cosine decay, global-norm clipping, a weight-decay mask and gradient accumulation.

The recipe is the Llama 2 paper's (β 0.9/0.95, eps 1e-5, decay 0.1, clip 1.0, cosine to 10% of peak). Weight decay
applies to matrices (embeddings included) and never to norm gains. Accumulation sums gradients of *summed* losses over
microbatches and divides once by the total token count, so it equals the big-batch gradient up to float rounding;
on a one-device CPU mesh each microbatch is differentiated as two independent half-batch chains (`gradient_chains`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from llama_jax.config import ConfigError, OptimConfig

GradFn = Callable[[Any, Any, jax.Array], tuple[tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]], Any]]
CPU_GRADIENT_CHAINS = 2  # independent row groups per microbatch on a one-device CPU mesh (`gradient_chains`)


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


def gradient_chains(platform: str, devices: int, rows: int) -> int:
    """Into how many independent row groups `accumulate_gradients` splits a microbatch of `rows`: two on a
    one-device CPU mesh (when `rows` is even), else one.

    XLA:CPU runs independent operations side by side on its cores, but one layer's forward and backward pass is a
    chain whose attention products and elementwise fusions each run on one core: a float32 bench-config step on the
    2-core AMD EPYC summed 2.95 s of operation time in 1.9 s, about a fifth of the two cores idle. Two half-batch
    chains fill those gaps. Alternating in one process (2026-12-07, medians of 7 rounds): the bench config's step
    1.04-1.05x faster in float32 and 1.04x in bf16 compute, `tiny` 1.06x, the README demo's 1.03x (bf16, dropout 0.1)
    and 1.04x (the same 5 layers in float32); four chains gained less. The bench step's compiled temporaries grow
    790 -> 836 MiB.
    Elsewhere one chain: on GPU and TPU one program already keeps the device busy, and splitting the batch over two
    simulated CPU devices was no faster than one device.
    """
    return CPU_GRADIENT_CHAINS if platform == "cpu" and devices == 1 and rows % CPU_GRADIENT_CHAINS == 0 else 1


def accumulate_gradients(grad_fn: GradFn, params: Any, batch: dict[str, jax.Array], steps: int, chains: int = 1
                         ) -> tuple[Any, jax.Array, jax.Array, dict[str, jax.Array]]:
    """Mean-per-unit gradient over `steps` microbatches of `batch`; returns (grads, loss_sum, count, sums).

    `grad_fn(params, rows, piece) -> ((loss_sum, (count, sums)), grads_of_loss_sum)`, where `count` is how many
    units (tokens, pairs) the loss sums over, `sums` a dict of further per-unit metric sums, added up like the loss,
    and `piece` (int32) numbers the call's rows within the step, so that each piece draws its own dropout masks.
    Microbatch i takes rows i, i+steps, ... so each device's contiguous shard of the batch splits locally; each
    microbatch is differentiated as `chains` independent groups of its rows (split the same way), whose gradients
    are summed (`gradient_chains` says why).
    """
    def split(x: jax.Array, n: int) -> jax.Array:
        """`[B, ...]` -> `[n, B / n, ...]`, piece j holding rows j, j + n, ..."""
        return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)

    def microbatch(micro: dict[str, jax.Array], first_piece: jax.Array
                   ) -> tuple[tuple[jax.Array, tuple[jax.Array, Any]], Any]:
        if chains == 1:
            return grad_fn(params, micro, first_piece)
        groups = jax.tree.map(lambda x: split(x, chains), micro)
        outs = [grad_fn(params, jax.tree.map(lambda x: x[c], groups), first_piece + c) for c in range(chains)]
        return jax.tree.map(lambda *parts: sum(parts[1:], parts[0]), *outs)

    if steps == 1:
        (loss_sum, (count, sums)), grads = microbatch(batch, jnp.int32(0))
    else:
        for x in jax.tree.leaves(batch):
            if x.shape[0] % steps:
                raise ConfigError(f"batch size {x.shape[0]} is not divisible by optim.grad_accum_steps={steps}")

        def body(carry: tuple[Any, jax.Array, Any], step: tuple[dict[str, jax.Array], jax.Array]
                 ) -> tuple[tuple[Any, jax.Array, Any], None]:
            grads, loss_sum, aux = carry
            (m_loss, m_aux), m_grads = microbatch(*step)
            return (jax.tree.map(jnp.add, grads, m_grads), loss_sum + m_loss, jax.tree.map(jnp.add, aux, m_aux)), None

        micros = jax.tree.map(lambda x: split(x, steps), batch)
        pieces = jnp.arange(steps, dtype=jnp.int32) * chains
        aux_shape = jax.eval_shape(microbatch, jax.tree.map(lambda x: x[0], micros), pieces[0])[0][1]
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        init = (zeros, jnp.zeros((), jnp.float32), jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shape))
        (grads, loss_sum, (count, sums)), _ = jax.lax.scan(body, init, (micros, pieces))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
    return grads, loss_sum, count, sums
