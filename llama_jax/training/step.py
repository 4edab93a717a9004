"""The jitted, sharded train step and the train state it carries; `token_losses` is shared with evaluation.

A `TrainState` holds the model's parameters (an nnx State split from a `Llama`), the optax state and the step
counter. `Trainer` owns the graphdef, the optimizer and the mesh; its step is compiled once with explicit in/out
shardings from `llama_jax.sharding.state_shardings`, and the train step donates the state it consumes.
Pretraining batches are `{"tokens": int32[batch, seq_len + 1]}` (as `llama_jax.data` yields them): inputs are
`tokens[:, :-1]`, targets `tokens[:, 1:]`. Fine-tuning batches (`llama_jax.data.sft`) give `tokens` and `targets`
(`[batch, seq_len]`) with a `loss_mask` and packed examples' `segment_ids` and `positions`.

With LoRA (`cfg.lora.rank > 0`) the model carries adapters and only they are trained: the state's `params` and the
optimizer hold just the `LoRAParam`s, and the frozen base travels beside them (`Trainer.frozen`), never updated.

Another objective (distillation) subclasses `Trainer`, replacing `objective` and passing what it needs besides the
model (a frozen teacher's parameters) as `inputs`, which every step takes as an argument with their own shardings.
With `optim.loss_scale` (float16 compute) the loss is scaled before differentiating (`training.loss_scale`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax import lora
from llama_jax.config import Config, ExecutionConfig
from llama_jax.lora import LoRAParam
from llama_jax.model import Llama
from llama_jax.sharding import batch_sharding, sharded_init, state_shardings
from llama_jax.training.loss import chunked_token_losses
from llama_jax.training.loss_scale import LossScaling
from llama_jax.training.optim import accumulate_gradients, make_optimizer

Batch = dict[str, jax.Array]


@jax.tree_util.register_dataclass
@dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def model_losses(model: Llama, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy (nats, float32) over the learned targets, and how many there are; the logits
    are computed in sequence chunks (`chunked_token_losses`).

    Masked targets are multiplied by zero, so neither the loss nor any gradient depends on them.
    """
    if "targets" not in batch:
        tokens = batch["tokens"]
        features, _ = model.features(tokens[:, :-1])
        losses = chunked_token_losses(model.logits, features, tokens[:, 1:])
        return jnp.sum(losses), jnp.float32(losses.size)
    features, _ = model.features(batch["tokens"], positions=batch.get("positions"),
                                 segment_ids=batch.get("segment_ids"))
    weights = batch["loss_mask"].astype(jnp.float32)
    losses = chunked_token_losses(model.logits, features, batch["targets"])
    return jnp.sum(losses * weights), jnp.sum(weights)


def token_losses(graphdef: nnx.GraphDef, params: Any, batch: Batch, *frozen: Any) -> tuple[jax.Array, jax.Array]:
    """`model_losses` of the model `graphdef` + `params` (+ the `frozen` states of a partly trained model)."""
    return model_losses(nnx.merge(graphdef, params, *frozen), batch)


class Trainer:
    """Builds and runs the train step of one config on one mesh."""

    def __init__(self, cfg: Config, mesh: Mesh):
        self.cfg, self.mesh = cfg, mesh
        self.lora = cfg.lora.rank > 0
        self.trainable = LoRAParam if self.lora else nnx.Param
        tx, self.schedule = make_optimizer(cfg.optim, cfg.train.steps)
        self.loss_scaling = LossScaling.from_config(cfg.optim, cfg.execution)
        self.tx = self.loss_scaling.wrap(tx) if self.loss_scaling else tx
        self.inputs: Any = ()  # arrays a subclass's objective needs besides the model (placed on the mesh)
        self.graphdef, abstract_frozen = self._split(nnx.eval_shape(self._ctor))[::2]
        self.frozen_sharding = state_shardings(abstract_frozen, mesh)
        # Under LoRA the base weights, set by init_state / set_base; otherwise nothing (a State without leaves).
        self.frozen: Any = None if self.lora else abstract_frozen
        self.state_sharding = self._shardings(cfg.execution)
        self._train: Callable[..., Any] | None = None

    def _ctor(self, execution: ExecutionConfig | None = None) -> Llama:
        return self.with_adapters(Llama(self.cfg.model, execution or self.cfg.execution,
                                        rngs=nnx.Rngs(self.cfg.train.seed)))

    def with_adapters(self, model: Llama) -> Llama:
        """`model` with fresh LoRA adapters attached (seeded by `train.seed`) when LoRA is on; else unchanged."""
        return lora.attach(model, self.cfg.lora, nnx.Rngs(self.cfg.train.seed + 1)) if self.lora else model

    def _split(self, model: Llama) -> tuple[nnx.GraphDef, Any, Any]:
        """(graphdef, trainable params, the rest: LoRA's frozen base, or nothing when every weight trains)."""
        return nnx.split(model, self.trainable, ...)

    def _shardings(self, execution: ExecutionConfig) -> TrainState:
        abstract_params = self._split(nnx.eval_shape(lambda: self._ctor(execution)))[1]
        return TrainState(step=NamedSharding(self.mesh, PartitionSpec()),
                          params=state_shardings(abstract_params, self.mesh),
                          opt_state=state_shardings(jax.eval_shape(self.tx.init, abstract_params), self.mesh))

    def abstract_frozen(self) -> Any:
        """Shapes, dtypes and shardings of the frozen part (the base weights under LoRA; empty otherwise)."""
        frozen = self._split(nnx.eval_shape(self._ctor))[2]
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), frozen,
                            self.frozen_sharding)

    def abstract_state(self, execution: ExecutionConfig | None = None) -> TrainState:
        """Shapes, dtypes and shardings of the train state (a restore target), allocating nothing; `execution`
        gives the state of another layout (e.g. the `scan_layers` a checkpoint was saved with)."""
        execution = execution or self.cfg.execution
        shapes = jax.eval_shape(lambda: self.init_state_from(self._split(self._ctor(execution))[1]))
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            shapes, self._shardings(execution))

    def init_state(self, model: Llama | Any | None = None) -> TrainState:
        """A fresh state with sharded parameters (random from the seed, or the weights of `model` — a `Llama` or its
        parameter State — plus fresh adapters under LoRA) and zero moments; sets `frozen`."""
        if model is None:
            model = sharded_init(self._ctor, self.mesh, self.cfg.train.seed)
        else:
            if not isinstance(model, Llama):
                plain = nnx.eval_shape(lambda: Llama(self.cfg.model, self.cfg.execution, rngs=nnx.Rngs(0)))
                model = nnx.merge(nnx.graphdef(plain), model)
            model = self.with_adapters(model)
        _, params, frozen = self._split(model)
        self.frozen = jax.device_put(frozen, self.frozen_sharding)
        params = jax.device_put(params, self.state_sharding.params)
        with jax.set_mesh(self.mesh):
            init = jax.jit(self.init_state_from, out_shardings=self.state_sharding)
            return init(params)

    def init_state_from(self, params: Any) -> TrainState:
        return TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params))

    def set_base(self, model: Llama) -> None:
        """Take `model`'s weights as the frozen base (LoRA), e.g. before restoring adapters from a checkpoint."""
        self.frozen = jax.device_put(self._split(self.with_adapters(model))[2], self.frozen_sharding)

    def model(self, params: Any) -> Llama:
        return nnx.merge(self.graphdef, params, self.frozen)

    def objective(self, model: Llama, batch: Batch, inputs: Any) -> tuple[jax.Array, jax.Array]:
        """(summed loss, how many targets it covers) that the step minimises; next-token cross-entropy here."""
        return model_losses(model, batch)

    def _train_step(self, state: TrainState, frozen: Any, inputs: Any, batch: Batch
                    ) -> tuple[TrainState, dict[str, jax.Array]]:
        scaling = self.loss_scaling
        # The scale multiplies the per-token mean loss (what torch's GradScaler sees), so one setting fits every batch
        # size: the summed loss is scaled by scale / (tokens in the batch).
        scale = state.opt_state.scale / batch["tokens"].size if scaling else jnp.float32(1.0)

        def loss(params: Any, micro: Batch) -> tuple[jax.Array, jax.Array]:
            model = nnx.merge(self.graphdef, params, frozen)
            with lora.dropout_key(jax.random.fold_in(jax.random.key(self.cfg.train.seed), state.step)):
                loss_sum, count = self.objective(model, micro, inputs)
            return loss_sum * scale, count

        grad_fn = jax.value_and_grad(loss, has_aux=True)
        grads, loss_sum, count = accumulate_gradients(grad_fn, state.params, batch, self.cfg.optim.grad_accum_steps)
        grads, loss_sum = jax.tree.map(lambda g: g / scale, grads), loss_sum / scale
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        loss, grad_norm = loss_sum / jnp.maximum(count, 1.0), optax.tree.norm(grads)
        # A NaN/Inf loss or gradient drops the whole update, so the state never holds one (the host decides what
        # to do next: train.nonfinite); selecting costs one elementwise pass over the state. A gradient overflow
        # that the loss scale absorbs is no such step: the scaler already skipped the update and lowered the scale.
        overflow = ~jnp.isfinite(grad_norm) & (scaling.absorbs_overflow(state.opt_state) if scaling else False)
        finite = jnp.isfinite(loss) & (jnp.isfinite(grad_norm) | overflow)
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), (params, opt_state),
                                         (state.params, state.opt_state))
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": self.schedule(state.step), "tokens": count,
                   "finite": finite}
        if scaling:
            metrics |= {"loss_scale": state.opt_state.scale, "overflow": overflow, "overflow_skips": opt_state.skipped}
        return TrainState(state.step + 1, params, opt_state), metrics

    def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer update (over `optim.grad_accum_steps` microbatches); `state` is donated."""
        if self.frozen is None:
            raise ValueError("a LoRA trainer needs its base weights: call init_state(model) or set_base first")
        with jax.set_mesh(self.mesh):
            return self.jitted_train_step(batch)(state, self.frozen, self.inputs, batch)

    def jitted_train_step(self, batch: Batch) -> Any:
        """The jitted `(state, frozen, inputs, batch)` step for batches shaped like `batch` (arrays or
        ShapeDtypeStructs); `plan` lowers it AOT."""
        if self._train is None:
            self._train = jax.jit(self._train_step, donate_argnums=0,
                                  in_shardings=(self.state_sharding, self.frozen_sharding,
                                                jax.tree.map(lambda a: a.sharding, self.inputs),
                                                self._batch_shardings(batch)),
                                  out_shardings=(self.state_sharding, NamedSharding(self.mesh, PartitionSpec())))
        return self._train

    def _batch_shardings(self, batch: Batch) -> dict[str, NamedSharding]:
        return {k: batch_sharding(self.mesh, v.shape) for k, v in batch.items()}
