"""The jitted, sharded train step and the train state it carries; `token_losses` is shared with evaluation.

A `TrainState` holds the model's parameters (an nnx State split from a `Llama`), the optax state and the step
counter. `Trainer` owns the graphdef, the optimizer and the mesh; its step is compiled once with explicit in/out
shardings from `llama_jax.sharding.state_shardings`, and the train step donates the state it consumes.
Pretraining batches are `{"tokens": int32[batch, seq_len + 1]}` (as `llama_jax.data` yields them): inputs are
`tokens[:, :-1]`, targets `tokens[:, 1:]`. Fine-tuning batches (`llama_jax.data.sft`) give `tokens` and `targets`
(`[batch, seq_len]`) with a `loss_mask` and packed examples' `segment_ids` and `positions`.

With LoRA (`cfg.lora.rank > 0`) the model carries adapters and only they are trained: the state's `params` and the
optimizer hold just the `LoRAParam`s, and the frozen base travels beside them (`Trainer.frozen`), never updated;
with `execution.quant` that base is int8/int4 (QLoRA). With a `prune` mask (magnitude or N:M), the optimizer chain starts with `compression.masks.keep_pruned`: the mask
is computed from the initial weights, stored in the optimizer state, and the masked weights stay exactly zero.
With `optim.loss_scale` (float16 compute) the loss is scaled before differentiating (`training.loss_scale`).

What the step minimises is an `Objective`: next-token cross-entropy by default; post-training stages (reward models,
DPO) pass their own loss over their own batch fields, and may attach weights of their own (a reward head);
distillation passes a frozen teacher's parameters as the objective's `inputs`, an argument of every step.
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
from llama_jax.attention import check_setting
from llama_jax.compression.masks import apply_masks, keep_pruned, masks_of
from llama_jax.config import Config, ConfigError, ExecutionConfig
from llama_jax.dropout import training_key
from llama_jax.lora import LoRAParam
from llama_jax.model import Llama
from llama_jax.sharding import batch_sharding, current_platform, sharded_init, state_shardings
from llama_jax.training.loss import chunked_token_losses
from llama_jax.training.loss_scale import LossScaling
from llama_jax.training.optim import accumulate_gradients, gradient_chains, make_optimizer

Batch = dict[str, jax.Array]


@jax.tree_util.register_dataclass
@dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def packed_features(model: Llama, batch: Batch) -> jax.Array:
    """Final-norm features of `batch["tokens"]` with its packed examples' `positions` and `segment_ids` (when
    given). Each example's positions count from 0, so they lie below the row length: RoPE reads them from its table."""
    tokens = batch["tokens"]
    features, _ = model.features(tokens, positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
                                 positions_below=tokens.shape[1])
    return features


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
    features = packed_features(model, batch)
    weights = batch["loss_mask"].astype(jnp.float32)
    losses = chunked_token_losses(model.logits, features, batch["targets"])
    return jnp.sum(losses * weights), jnp.sum(weights)


LossFn = Callable[[Llama, Batch], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


@dataclass(frozen=True)
class Objective:
    """What a train step minimises. `loss(model, batch)` returns the loss summed over the batch's units (target
    tokens, preference pairs), how many units there are, and sums of further per-unit metrics (each is reported
    divided by the count, e.g. a pair accuracy); `attach(model)` adds the stage's own weights to a fresh or loaded
    `Llama` in place (before LoRA adapters) and returns it. `inputs`, when set, are arrays the loss needs besides
    the model (a frozen teacher's parameters, placed on the mesh): every step takes them as an argument, sharded as
    they are, and calls `loss(model, batch, inputs)`."""

    loss: LossFn
    attach: Callable[[Llama], Llama] | None = None
    inputs: Any = None


def next_token_loss(model: Llama, batch: Batch) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    return (*model_losses(model, batch), {})


NEXT_TOKEN = Objective(next_token_loss)


def token_losses(graphdef: nnx.GraphDef, params: Any, batch: Batch, *frozen: Any) -> tuple[jax.Array, jax.Array]:
    """`model_losses` of the model `graphdef` + `params` (+ the `frozen` states of a partly trained model)."""
    return model_losses(nnx.merge(graphdef, params, *frozen), batch)


def check_prune(cfg: Config) -> bool:
    """True when training keeps a pruning mask (`prune.method` magnitude or N:M); rejects what cannot train."""
    if cfg.prune.method == "structured":
        raise ConfigError("prune.method=structured rewrites a checkpoint (python -m llama_jax prune); train on its "
                          "output with prune.method=none")
    if cfg.prune.masks_weights and cfg.lora.rank > 0:
        raise ConfigError("a prune mask applies to full training; LoRA trains adapters only (set lora.rank=0 or "
                          "prune.method=none)")
    return cfg.prune.masks_weights


class Trainer:
    """Builds and runs the train step of one config on one mesh."""

    def __init__(self, cfg: Config, mesh: Mesh, objective: Objective = NEXT_TOKEN):
        self.cfg, self.mesh, self.objective = cfg, mesh, objective
        check_setting(cfg.execution.attention, mesh.devices.flat[0].platform, cfg.execution.dtype, cfg.model.head_dim)
        self.lora = cfg.lora.rank > 0
        if cfg.execution.quant != "none" and not self.lora:
            raise ConfigError(f"execution.quant={cfg.execution.quant} keeps the weights quantized and frozen; train "
                              "LoRA adapters over them (QLoRA: lora.rank > 0) or set execution.quant=none")
        self.trainable = LoRAParam if self.lora else nnx.Param
        tx, self.schedule = make_optimizer(cfg.optim, cfg.train.steps)
        self.pruned = check_prune(cfg)
        if self.pruned:
            tx = optax.chain(keep_pruned(cfg.prune), tx)
        self.loss_scaling = LossScaling.from_config(cfg.optim, cfg.execution)
        self.tx = self.loss_scaling.wrap(tx) if self.loss_scaling else tx
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
        """`model` with the objective's own weights and fresh LoRA adapters attached (seeded by `train.seed`) when
        LoRA is on."""
        if self.objective.attach is not None:
            model = self.objective.attach(model)
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
        """Step 0 with fresh optimizer moments; with a `prune` mask, the masked weights are zeroed here."""
        opt_state = self.tx.init(params)
        if self.pruned:
            params = apply_masks(params, masks_of(opt_state))
        return TrainState(jnp.zeros((), jnp.int32), params, opt_state)

    def set_base(self, model: Llama) -> None:
        """Take `model`'s weights as the frozen base (LoRA), e.g. before restoring adapters from a checkpoint."""
        self.frozen = jax.device_put(self._split(self.with_adapters(model))[2], self.frozen_sharding)

    def model(self, params: Any) -> Llama:
        return nnx.merge(self.graphdef, params, self.frozen)

    def _train_step(self, state: TrainState, frozen: Any, inputs: Any, batch: Batch
                    ) -> tuple[TrainState, dict[str, jax.Array]]:
        scaling = self.loss_scaling
        # The scale multiplies the loss per token (what torch's GradScaler sees as a mean loss), so one setting fits
        # every batch size: the summed loss is scaled by scale / (elements of the batch's largest field).
        scale = state.opt_state.scale / max(v.size for v in batch.values()) if scaling else jnp.float32(1.0)
        extra = () if inputs is None else (inputs,)

        step_key = jax.random.fold_in(jax.random.key(self.cfg.train.seed), state.step)

        def loss(params: Any, micro: Batch, piece: jax.Array
                 ) -> tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]:
            model = nnx.merge(self.graphdef, params, frozen)
            with training_key(jax.random.fold_in(step_key, piece)):
                loss_sum, count, sums = self.objective.loss(model, micro, *extra)
            return loss_sum * scale, (count, sums)

        steps = self.cfg.optim.grad_accum_steps
        rows = {x.shape[0] for x in jax.tree.leaves(batch)}
        chains = gradient_chains(current_platform(), self.mesh.size, rows.pop() // steps) if len(rows) == 1 else 1
        grad_fn = jax.value_and_grad(loss, has_aux=True)
        grads, loss_sum, count, sums = accumulate_gradients(grad_fn, state.params, batch, steps, chains)
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
                   "finite": finite, **{k: v / jnp.maximum(count, 1.0) for k, v in sums.items()}}
        if scaling:
            metrics |= {"loss_scale": state.opt_state.scale, "overflow": overflow, "overflow_skips": opt_state.skipped}
        return TrainState(state.step + 1, params, opt_state), metrics

    def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer update (over `optim.grad_accum_steps` microbatches); `state` is donated."""
        if self.frozen is None:
            raise ValueError("a LoRA trainer needs its base weights: call init_state(model) or set_base first")
        with jax.set_mesh(self.mesh):
            return self.jitted_train_step(batch)(state, self.frozen, self.objective.inputs, batch)

    def jitted_train_step(self, batch: Batch) -> Any:
        """The jitted `(state, frozen, inputs, batch)` step for batches shaped like `batch` (arrays or
        ShapeDtypeStructs); `plan` lowers it AOT."""
        if self._train is None:
            self._train = jax.jit(self._train_step, donate_argnums=0,
                                  in_shardings=(self.state_sharding, self.frozen_sharding,
                                                jax.tree.map(lambda a: a.sharding, self.objective.inputs),
                                                self._batch_shardings(batch)),
                                  out_shardings=(self.state_sharding, NamedSharding(self.mesh, PartitionSpec())))
        return self._train

    def _batch_shardings(self, batch: Batch) -> dict[str, NamedSharding]:
        return {k: batch_sharding(self.mesh, v.shape) for k, v in batch.items()}
