"""Knowledge distillation on the pretraining loop: a frozen teacher's soft targets train a smaller student.

Loss per target token: `alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student,
next token)` (Hinton et al. 2015: T^2 keeps the soft-target gradients' size independent of T), plus, with
`distill.hidden_weight`, that times the mean squared error between the final hidden states (the student's through a
learned projection when the widths differ). The teacher (any checkpoint format) is loaded onto the run's mesh and
its logits are computed on the fly inside the jitted step, in the same sequence chunks as the student's, so neither
`[batch, seq, vocab]` tensor exists whole. Data, tokenizer, resume, metrics and SIGTERM are the pretraining loop's;
the tokenizer is the teacher's (`data.tokenizer`, or the `tokenizer.model` beside the teacher).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from llama_jax.checkpoints import load_pretrained, save_pretrained
from llama_jax.checkpoints.io import FORMATS, detect_format
from llama_jax.config import Config, ConfigError
from llama_jax.data import build_train_data, build_validation_data
from llama_jax.distributed import initialize
from llama_jax.model import Llama, Normal
from llama_jax.paths import as_path
from llama_jax.sharding import check_model_fits, make_mesh, state_shardings
from llama_jax.training.finetune import stage_tokenizer
from llama_jax.training.loop import TrainResult, check_train, lock_run_dir, run_training
from llama_jax.training.loss import chunked_map
from llama_jax.training.step import Batch, Objective, Trainer

PROJECTION = "distill_projection"  # the student's attribute holding the learned hidden-state projection
STUDENT_DIR = "student"  # with a projection, the finished student without it (what to load and evaluate)


def distillation_losses(student_logits: jax.Array, teacher_logits: jax.Array, targets: jax.Array, alpha: float,
                        temperature: float) -> jax.Array:
    """Per-token `alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, targets)`, float32."""
    t = jnp.float32(temperature)
    student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t)
    teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t)
    kl = optax.losses.kl_divergence_with_log_targets(student, teacher)
    ce = optax.softmax_cross_entropy_with_integer_labels(student_logits, targets)
    return alpha * t * t * kl + (1 - alpha) * ce


def distill_objective(cfg: Config, teacher: Llama, mesh: Mesh) -> Objective:
    """The distillation loss of `cfg.distill` against `teacher`, whose parameters (placed on `mesh`) are the
    objective's inputs; with a hidden-state loss between different widths, `attach` adds the projection."""
    d, teacher_dim = cfg.distill, teacher.cfg.dim
    teacher_graphdef, teacher_params = nnx.split(teacher)

    def attach(model: Llama) -> Llama:
        init = Normal(model.cfg.dim ** -0.5)
        key = nnx.Rngs(cfg.train.seed + 2).params()
        shape, dtype = (model.cfg.dim, teacher_dim), jnp.dtype(model.execution.param_dtype)
        setattr(model, PROJECTION, nnx.Param(init(key, shape, dtype), axes=("embed", None), init=init))
        return model

    def loss(model: Llama, batch: Batch, inputs: Any) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        if "targets" in batch:
            raise ConfigError("distillation reads pretraining data (data.sources), not fine-tuning JSONL batches")
        teacher = nnx.merge(teacher_graphdef, inputs)  # not differentiated: only the student's params are
        tokens = batch["tokens"]
        features, _ = model.features(tokens[:, :-1])
        teacher_features, _ = teacher.features(tokens[:, :-1])
        projection = getattr(model, PROJECTION, None)

        def per_chunk(f: jax.Array, tf: jax.Array, y: jax.Array) -> jax.Array:
            losses = distillation_losses(model.logits(f), teacher.logits(tf), y, d.alpha, d.temperature)
            if d.hidden_weight > 0:
                f = f.astype(jnp.float32)
                mapped = f if projection is None else jnp.einsum("BTD,DE->BTE", f, projection[...])
                losses += d.hidden_weight * jnp.mean(jnp.square(mapped - tf.astype(jnp.float32)), axis=-1)
            return losses

        losses = chunked_map(per_chunk, (features, teacher_features, tokens[:, 1:]))
        return jnp.sum(losses), jnp.float32(losses.size), {}

    projected = d.hidden_weight > 0 and cfg.model.dim != teacher_dim
    inputs = jax.device_put(teacher_params, state_shardings(teacher_params, mesh))
    return Objective(loss, attach if projected else None, inputs)


def plain_student(trainer: Trainer, params: Any) -> Llama:
    """The trained student as a plain `Llama` (the projection, if any, left out)."""
    trained = {k: v for k, v in nnx.to_pure_dict(params).items() if k != PROJECTION}
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(trainer.cfg.model, trainer.cfg.execution,
                                                             rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, trained)
    return nnx.merge(graphdef, state)


def distill(cfg: Config) -> TrainResult:
    """Distil `distill.teacher` into the student `cfg` describes (resuming a run in `checkpoint.dir`)."""
    teacher = cfg.distill.teacher
    if not teacher:
        raise ConfigError("distill.teacher is not set; give the teacher checkpoint (HF, Meta, orbax, run dir)")
    detect_format(teacher)  # a missing or unknown teacher fails here, before anything is written
    if cfg.lora.rank > 0:
        raise ConfigError("distillation trains every student weight; set lora.rank=0")
    check_train(cfg)
    initialize(cfg.train)
    with lock_run_dir(cfg):
        return _distill(cfg)


def _distill(cfg: Config) -> TrainResult:
    d, run_dir = cfg.distill, as_path(cfg.checkpoint.dir)
    if cfg.train.init_from:
        cfg = dataclasses.replace(cfg, model=FORMATS[detect_format(cfg.train.init_from)].read(
            as_path(cfg.train.init_from))[0])
    mesh = make_mesh(cfg.mesh)
    check_model_fits(cfg.model, mesh)
    teacher = load_pretrained(d.teacher, mesh, cfg.execution)
    if teacher.cfg.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"the teacher has {teacher.cfg.vocab_size} tokens but the student {cfg.model.vocab_size}; "
                          "set model.vocab_size to the teacher's")
    tokenizer = stage_tokenizer(
        dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, init_from=d.teacher)))
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the teacher's tokenizer has {tokenizer.vocab_size} tokens but the model only "
                          f"{cfg.model.vocab_size}; use the teacher's tokenizer and vocabulary")
    if not cfg.data.tokenizer:  # kept in the run directory, as pretraining keeps its own
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "tokenizer.model").write_bytes(as_path(tokenizer.path).read_bytes())
    data = build_train_data(cfg, tokenizer, mesh=mesh)
    validation = build_validation_data(cfg, tokenizer, mesh=mesh)
    trainer = Trainer(cfg, mesh, distill_objective(cfg, teacher, mesh))
    result = run_training(cfg, trainer, data, validation, tokenizer, cfg.train.init_from)
    if result.state is not None and PROJECTION in nnx.to_pure_dict(result.state.params) and jax.process_index() == 0:
        save_pretrained(plain_student(trainer, result.state.params), run_dir / STUDENT_DIR, "orbax", overwrite=True)
    return result
