"""Pretraining data: TFDS or local text sources -> packed, shuffled, per-process, checkpointable token batches."""

from llama_jax.data.pipeline import (
    DataIterator,
    ValidationData,
    build_train_data,
    build_validation_data,
    global_batch,
    provision_tokenizer,
)

__all__ = ["DataIterator", "ValidationData", "build_train_data", "build_validation_data", "global_batch",
           "provision_tokenizer"]
