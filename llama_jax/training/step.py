"""The jitted, sharded train step and the train state it carries; `token_losses` is shared with evaluation.

A `TrainState` holds the model's parameters (an nnx State split from a `Llama`), the optax state and the step
counter. `Trainer` owns the graphdef, the optimizer and the mesh; its step is compiled once with explicit in/out
shardings from `llama_jax.sharding.state_shardings`, and the train step donates the state it consumes.
Batches are `{"tokens": int32[batch, seq_len + 1]}` (as `llama_jax.data` yields them): inputs are `tokens[:, :-1]`,
targets `tokens[:, 1:]`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.config import Config, ExecutionConfig
from llama_jax.model import Llama
from llama_jax.sharding import batch_sharding, sharded_init, state_shardings
from llama_jax.training.optim import accumulate_gradients, make_optimizer

Batch = dict[str, jax.Array]


@jax.tree_util.register_dataclass
@dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def token_losses(graphdef: nnx.GraphDef, params: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy (nats, float32) and the number of targets."""
    tokens = batch["tokens"]
    logits = nnx.merge(graphdef, params)(tokens[:, :-1]).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return jnp.sum(losses), jnp.float32(losses.size)


class Trainer:
    """Builds and runs the train step of one config on one mesh."""

    def __init__(self, cfg: Config, mesh: Mesh):
        self.cfg, self.mesh = cfg, mesh
        self.tx, self.schedule = make_optimizer(cfg.optim, cfg.train.steps)
        self.graphdef = nnx.graphdef(nnx.eval_shape(self._ctor))
        self.state_sharding = self._shardings(cfg.execution)
        self._train: Callable[..., Any] | None = None

    def _ctor(self, execution: ExecutionConfig | None = None) -> Llama:
        return Llama(self.cfg.model, execution or self.cfg.execution, rngs=nnx.Rngs(self.cfg.train.seed))

    def _shardings(self, execution: ExecutionConfig) -> TrainState:
        abstract_params = nnx.state(nnx.eval_shape(lambda: self._ctor(execution)))
        return TrainState(step=NamedSharding(self.mesh, PartitionSpec()),
                          params=state_shardings(abstract_params, self.mesh),
                          opt_state=state_shardings(jax.eval_shape(self.tx.init, abstract_params), self.mesh))

    def abstract_state(self, execution: ExecutionConfig | None = None) -> TrainState:
        """Shapes, dtypes and shardings of the train state (a restore target), allocating nothing; `execution`
        gives the state of another layout (e.g. the `scan_layers` a checkpoint was saved with)."""
        execution = execution or self.cfg.execution
        shapes = jax.eval_shape(lambda: self.init_state_from(nnx.state(self._ctor(execution))))
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            shapes, self._shardings(execution))

    def init_state(self, params: Any | None = None) -> TrainState:
        """A fresh state with sharded parameters (random from the seed, or the given ones) and zero moments."""
        if params is None:
            params = nnx.state(sharded_init(self._ctor, self.mesh))
        else:
            params = jax.device_put(params, self.state_sharding.params)
        with jax.set_mesh(self.mesh):
            init = jax.jit(self.init_state_from, out_shardings=self.state_sharding)
            return init(params)

    def init_state_from(self, params: Any) -> TrainState:
        return TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params))

    def model(self, params: Any) -> Llama:
        return nnx.merge(self.graphdef, params)

    def _train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        grad_fn = jax.value_and_grad(functools.partial(token_losses, self.graphdef), has_aux=True)
        grads, loss_sum, count = accumulate_gradients(grad_fn, state.params, batch, self.cfg.optim.grad_accum_steps)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        loss, grad_norm = loss_sum / jnp.maximum(count, 1.0), optax.tree.norm(grads)
        # A NaN/Inf loss or gradient drops the whole update, so the state never holds one (the host decides what
        # to do next: train.nonfinite); selecting costs one elementwise pass over the state.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), (params, opt_state),
                                         (state.params, state.opt_state))
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": self.schedule(state.step), "tokens": count,
                   "finite": finite}
        return TrainState(state.step + 1, params, opt_state), metrics

    def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer update (over `optim.grad_accum_steps` microbatches); `state` is donated."""
        with jax.set_mesh(self.mesh):
            return self.jitted_train_step(batch)(state, batch)

    def jitted_train_step(self, batch: Batch) -> Any:
        """The jitted step for batches shaped like `batch` (arrays or ShapeDtypeStructs); `plan` lowers it AOT."""
        if self._train is None:
            self._train = jax.jit(self._train_step, donate_argnums=0,
                                  in_shardings=(self.state_sharding, self._batch_shardings(batch)),
                                  out_shardings=(self.state_sharding, NamedSharding(self.mesh, PartitionSpec())))
        return self._train

    def _batch_shardings(self, batch: Batch) -> dict[str, NamedSharding]:
        return {k: batch_sharding(self.mesh, v.shape) for k, v in batch.items()}
