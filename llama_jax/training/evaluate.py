"""Validation loss, perplexity and bits per byte of a model over a validation stream.

Bits per byte = total target nats / ln 2 / total UTF-8 bytes of the target text, so it compares models with
different tokenizers. Batches are `{"tokens": int32[B, T+1], "target_bytes": int32[B]}` as `llama_jax.data` yields
them (already sharded over the mesh), or fine-tuning batches (`llama_jax.data.sft`), whose loss covers only the
learned (answer) tokens and which have no bits per byte; one jitted loss-sum program serves every call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from llama_jax.checkpoints import load_pretrained
from llama_jax.config import DataSource, load_config
from llama_jax.data import build_validation_data
from llama_jax.model import Llama
from llama_jax.sharding import check_model_fits, make_mesh
from llama_jax.tokenizer import Tokenizer
from llama_jax.training.step import token_losses

_loss_sums = jax.jit(token_losses)


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    bits_per_byte: float | None
    tokens: int
    bytes: int

    def scalars(self) -> dict[str, float]:
        out = {"loss": self.loss, "perplexity": self.perplexity}
        return out if self.bits_per_byte is None else {**out, "bits_per_byte": self.bits_per_byte}

    def report(self) -> str:
        if self.bits_per_byte is None:
            return f"loss {self.loss:.4f}  perplexity {self.perplexity:.3f}  ({self.tokens} target tokens)"
        return (f"loss {self.loss:.4f}  perplexity {self.perplexity:.3f}  bits/byte {self.bits_per_byte:.4f}  "
                f"({self.tokens} tokens, {self.bytes} bytes)")


def evaluate(model: Llama, batches: Iterable[dict[str, Any]], mesh: Mesh | None = None,
             max_batches: int | None = None) -> EvalResult:
    """Mean next-token loss, perplexity and bits per byte over (at most `max_batches` of) `batches`."""
    graphdef, params = nnx.split(model)
    nats, tokens, n_bytes, has_bytes = 0.0, 0.0, 0.0, True
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        for batch in itertools.islice(batches, max_batches):
            loss_sum, count = _loss_sums(graphdef, params, {k: v for k, v in batch.items() if k != "target_bytes"})
            nats += float(loss_sum)
            tokens += float(count)
            has_bytes = has_bytes and "target_bytes" in batch
            n_bytes += float(jnp.sum(batch["target_bytes"])) if has_bytes else 0.0
    if tokens == 0:
        raise ValueError("the validation stream yielded no batches; provide more validation text or a smaller batch")
    loss = nats / tokens
    bits_per_byte = nats / math.log(2) / max(n_bytes, 1.0) if has_bytes else None
    return EvalResult(loss, math.exp(min(loss, 700.0)), bits_per_byte, int(tokens), int(n_bytes))


def evaluate_checkpoint(checkpoint: str | Path, data: str, tokenizer: str | Path | None = None,
                        split: str = "validation", data_dir: str | None = None, seq_len: int = 256,
                        batch_size: int = 8, max_batches: int | None = None,
                        overrides: Sequence[str] = ()) -> EvalResult:
    """Load any supported checkpoint and evaluate it on a dataset split (a TFDS name or local text files).

    The tokenizer defaults to `tokenizer.model` in a training run directory; `overrides` are config `key=value`
    strings (e.g. `mesh.tensor=2`, `data.cache_dir=...`).
    """
    cfg = load_config(None, overrides)
    cfg.data = dataclasses.replace(cfg.data, validation=DataSource(name=data, split=split), seq_len=seq_len,
                                   data_dir=data_dir or cfg.data.data_dir)
    cfg.train.batch_size = batch_size
    mesh = make_mesh(cfg.mesh)
    model = load_pretrained(checkpoint, mesh, cfg.execution)
    cfg.model = model.cfg
    check_model_fits(model.cfg, mesh)
    batches = build_validation_data(cfg, Tokenizer(tokenizer or _run_tokenizer(Path(checkpoint))), mesh=mesh)
    return evaluate(model, batches, mesh, max_batches)


def _run_tokenizer(checkpoint: Path) -> Path:
    for directory in (checkpoint, checkpoint.parent):
        if (directory / "tokenizer.model").is_file():
            return directory / "tokenizer.model"
    raise FileNotFoundError(f"no tokenizer.model next to '{checkpoint}'; pass --tokenizer FILE")
