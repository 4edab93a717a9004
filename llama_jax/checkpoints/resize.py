"""Growing a model's vocabulary (after extending its tokenizer) without changing any existing token's outputs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import sentencepiece as spm
from flax import nnx

from llama_jax.checkpoints.io import detect_format, load_pretrained, save_pretrained
from llama_jax.model import Llama
from llama_jax.paths import AnyPath, PathLike


def _grow(table: jnp.ndarray, new_rows: int, axis: int) -> jnp.ndarray:
    """Append `new_rows` copies of the mean old row along `axis`."""
    mean = jnp.mean(table.astype(jnp.float32), axis=axis, keepdims=True).astype(table.dtype)
    return jnp.concatenate([table, jnp.repeat(mean, new_rows, axis=axis)], axis=axis)


def resize_vocab(model: Llama, new_vocab_size: int) -> Llama:
    """A copy of `model` with `new_vocab_size` tokens: new embedding rows and classifier columns are the mean of
    the old ones (a neutral start for fine-tuning); old tokens' embeddings and logits are unchanged."""
    cfg = model.cfg
    if new_vocab_size < cfg.vocab_size:
        raise ValueError(f"new vocab size {new_vocab_size} is smaller than the model's {cfg.vocab_size}; "
                         "shrinking would drop trained tokens")
    extra = new_vocab_size - cfg.vocab_size
    state = nnx.to_pure_dict(nnx.state(model))
    state["tok_embeddings"] = _grow(state["tok_embeddings"], extra, axis=0)
    if not cfg.tie_embeddings:
        state["output"] = _grow(state["output"], extra, axis=1)
    new_cfg = dataclasses.replace(cfg, vocab_size=new_vocab_size)
    resized = nnx.eval_shape(lambda: Llama(new_cfg, model.execution, rngs=nnx.Rngs(0)))
    new_graphdef, abstract = nnx.split(resized)
    nnx.replace_by_pure_dict(abstract, state)
    return nnx.merge(new_graphdef, abstract)


def resize_checkpoint(src: PathLike, tokenizer: PathLike, dst: PathLike, format: str | None = None,
                      overwrite: bool = False) -> AnyPath:
    """Resize the checkpoint at `src` to the sentencepiece model `tokenizer`'s size; write `format` (default: the
    source's) to `dst`."""
    if not Path(tokenizer).is_file():
        raise FileNotFoundError(f"tokenizer model '{tokenizer}' does not exist; pass the extended .model file")
    size = spm.SentencePieceProcessor(model_file=str(tokenizer)).get_piece_size()
    fmt = format or detect_format(src)
    return save_pretrained(resize_vocab(load_pretrained(src), size), dst, format=fmt, overwrite=overwrite)
