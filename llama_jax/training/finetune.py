"""Supervised fine-tuning (full or LoRA) on JSONL data, on the pretraining loop (resume, metrics, SIGTERM).

The model section comes from `finetune.init_from` (any checkpoint format), so a config names only what changes.
`finetune.epochs` turns into `train.steps` over the packed rows. Under LoRA the run directory's checkpoints hold the
adapters and their optimizer state only; the finished adapter is also written in PEFT format to `<run>/adapter`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TypeVar

from jax.sharding import Mesh

from llama_jax.checkpoints.io import FORMATS, detect_format
from llama_jax.checkpoints.peft import save_peft
from llama_jax.config import Config, ConfigError
from llama_jax.data.sft import build_sft_data
from llama_jax.distributed import initialize
from llama_jax.paths import as_path
from llama_jax.sharding import check_model_fits, make_mesh
from llama_jax.tokenizer import Tokenizer
from llama_jax.training.loop import TrainResult, check_train, lock_run_dir, run_training
from llama_jax.training.step import Trainer

ADAPTER_DIR = "adapter"
T = TypeVar("T")


def stage_tokenizer(cfg: Config) -> Tokenizer:
    """`data.tokenizer`, else the `tokenizer.model` beside `finetune.init_from` (a training run keeps one there)."""
    if cfg.data.tokenizer:
        return Tokenizer(cfg.data.tokenizer)
    source = as_path(cfg.finetune.init_from)
    for directory in (source, source.parent):
        if (directory / "tokenizer.model").exists():
            return Tokenizer(directory / "tokenizer.model")
    raise ConfigError(f"no tokenizer.model beside '{source}'; set data.tokenizer=PATH")


def run_stage(cfg: Config, body: Callable[[Config, Mesh, Tokenizer], T]) -> T:
    """Run a stage that starts from `finetune.init_from` (fine-tuning, reward models, DPO): start the runtime, lock
    the run directory, take the model section from the checkpoint, then `body(cfg, mesh, tokenizer)`."""
    if not cfg.finetune.init_from:
        raise ConfigError("finetune.init_from is not set; give the checkpoint to start from (HF, Meta, orbax, run dir)")
    check_train(cfg)
    initialize(cfg.train)
    with lock_run_dir(cfg):
        architecture = FORMATS[detect_format(cfg.finetune.init_from)].read(as_path(cfg.finetune.init_from))[0]
        cfg = dataclasses.replace(cfg, model=architecture, train=dataclasses.replace(cfg.train))
        mesh = make_mesh(cfg.mesh)
        check_model_fits(cfg.model, mesh)
        tokenizer = stage_tokenizer(cfg)
        if tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.model.vocab_size}; "
                              "use the model's tokenizer (data.tokenizer)")
        return body(cfg, mesh, tokenizer)


def epochs_to_steps(cfg: Config, steps_per_epoch: int) -> None:
    """`finetune.epochs` > 0 sets `train.steps` (in place) from the number of batches in one epoch."""
    if cfg.finetune.epochs > 0:
        cfg.train.steps = max(1, math.ceil(cfg.finetune.epochs * steps_per_epoch))


def finetune(cfg: Config) -> TrainResult:
    """Fine-tune `finetune.init_from` on `finetune.train` as `cfg` describes (resuming a run in `checkpoint.dir`)."""
    return run_stage(cfg, _finetune)


def _finetune(cfg: Config, mesh: Mesh, tokenizer: Tokenizer) -> TrainResult:
    data = build_sft_data(cfg, tokenizer, mesh)
    epochs_to_steps(cfg, data.steps_per_epoch)
    trainer = Trainer(cfg, mesh)
    result = run_training(cfg, trainer, data.train, data.validation, tokenizer, cfg.finetune.init_from)
    export_adapter(cfg, trainer, result)
    return result


def export_adapter(cfg: Config, trainer: Trainer, result: TrainResult) -> None:
    """Under LoRA, write the finished adapter in PEFT format to `<run>/adapter` (every process joins the gather of the
    sharded adapters, process 0 writes)."""
    if trainer.lora and result.state is not None:
        save_peft(trainer.model(result.state.params), cfg.lora, as_path(cfg.checkpoint.dir) / ADAPTER_DIR)
