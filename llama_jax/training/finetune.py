"""Supervised fine-tuning (full or LoRA) on JSONL data, on the pretraining loop (resume, metrics, SIGTERM).

The model section comes from `finetune.init_from` (any checkpoint format), so a config names only what changes.
`finetune.epochs` turns into `train.steps` over the packed rows. Under LoRA the run directory's checkpoints hold the
adapters and their optimizer state only; the finished adapter is also written in PEFT format to `<run>/adapter`.
"""

from __future__ import annotations

import dataclasses
import math

import jax

from llama_jax.checkpoints.io import FORMATS, detect_format
from llama_jax.checkpoints.peft import save_peft
from llama_jax.config import Config, ConfigError
from llama_jax.data.sft import build_sft_data
from llama_jax.paths import as_path
from llama_jax.sharding import check_model_fits, make_mesh
from llama_jax.tokenizer import Tokenizer
from llama_jax.training.loop import TrainResult, run_locked, run_training
from llama_jax.training.step import Trainer

ADAPTER_DIR = "adapter"


def model_tokenizer(cfg: Config, checkpoint: str) -> Tokenizer:
    """`data.tokenizer`, else the `tokenizer.model` beside `checkpoint` (a training run keeps one there), checked
    against the model section's vocabulary."""
    tokenizer = _find_tokenizer(cfg, checkpoint)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.model.vocab_size}; "
                          "use the model's tokenizer (data.tokenizer)")
    return tokenizer


def _find_tokenizer(cfg: Config, checkpoint: str) -> Tokenizer:
    if cfg.data.tokenizer:
        return Tokenizer(cfg.data.tokenizer)
    source = as_path(checkpoint)
    for directory in (source, source.parent):
        if (directory / "tokenizer.model").exists():
            return Tokenizer(directory / "tokenizer.model")
    raise ConfigError(f"no tokenizer.model beside '{source}'; set data.tokenizer=PATH")


def finetune(cfg: Config) -> TrainResult:
    """Fine-tune `finetune.init_from` on `finetune.train` as `cfg` describes (resuming a run in `checkpoint.dir`)."""
    ft = cfg.finetune
    if not ft.init_from:
        raise ConfigError("finetune.init_from is not set; give the checkpoint to fine-tune (HF, Meta, orbax, run dir)")
    return run_locked(cfg, _finetune)


def _finetune(cfg: Config) -> TrainResult:
    ft = cfg.finetune
    architecture = FORMATS[detect_format(ft.init_from)].read(as_path(ft.init_from))[0]
    cfg = dataclasses.replace(cfg, model=architecture, train=dataclasses.replace(cfg.train))
    mesh = make_mesh(cfg.mesh)
    check_model_fits(cfg.model, mesh)
    tokenizer = model_tokenizer(cfg, ft.init_from)
    data = build_sft_data(cfg, tokenizer, mesh)
    if ft.epochs > 0:
        cfg.train.steps = max(1, math.ceil(ft.epochs * data.steps_per_epoch))
    trainer = Trainer(cfg, mesh)
    result = run_training(cfg, trainer, data.train, data.validation, tokenizer, ft.init_from)
    if trainer.lora and result.state is not None and jax.process_index() == 0:
        save_peft(trainer.model(result.state.params), cfg.lora, as_path(cfg.checkpoint.dir) / ADAPTER_DIR)
    return result
