"""`python -m llama_jax prune`: prune a checkpoint of any format as a `prune` config section says, and write it.

Magnitude and N:M pruning keep every shape and zero weights in place (the zeros are the mask: a recovery run with
the same `prune` section recomputes exactly this mask from them and keeps it fixed); structured pruning writes a
smaller model. A sentencepiece `tokenizer.model` beside the input (a training run keeps one) is copied beside the
output, where `finetune` and `train.init_from` users look for it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import jax
from flax import nnx

from llama_jax.checkpoints.io import detect_format, load_pretrained, save_pretrained
from llama_jax.compression.masks import apply_masks, projection_sparsity, pruning_masks
from llama_jax.compression.structured import prune_structured
from llama_jax.config import ConfigError, LlamaConfig, PruneConfig
from llama_jax.model import Llama
from llama_jax.paths import AnyPath, PathLike, as_path

TOKENIZER = "tokenizer.model"


@dataclass
class PruneResult:
    path: AnyPath
    method: str
    before: LlamaConfig
    after: LlamaConfig
    sparsity_before: float
    sparsity_after: float

    def report(self) -> str:
        return (f"{self.path}: {self.method} pruning; projection sparsity {self.sparsity_before:.1%} -> "
                f"{self.sparsity_after:.1%}; parameters {self.before.num_params():,} -> {self.after.num_params():,}")


def prune_model(model: Llama, cfg: PruneConfig) -> Llama:
    """A pruned copy of `model`: smaller for `structured`, else the same shapes with the masked weights zeroed."""
    if cfg.method == "structured":
        if cfg.ffn_hidden_dim is None and cfg.n_kv_heads is None:
            raise ConfigError("prune.method=structured needs prune.ffn_hidden_dim and/or prune.n_kv_heads (the "
                              "widths to keep)")
        return prune_structured(model, cfg.ffn_hidden_dim, cfg.n_kv_heads)
    if cfg.method == "none":
        raise ConfigError("prune.method is none; choose magnitude, an N:M pattern such as 2:4, or structured")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    prune = jax.jit(lambda p: apply_masks(p, pruning_masks(p, cfg)))  # one program, not one per op and shape
    return nnx.merge(graphdef, prune(params), rest)


def prune_checkpoint(src: PathLike, dst: PathLike, cfg: PruneConfig, format: str | None = None,
                     dtype: str | None = None, overwrite: bool = False) -> PruneResult:
    """Prune the checkpoint at `src` and write it to `dst` in `format` (default: the input's)."""
    fmt = format or detect_format(src)
    model = load_pretrained(src)
    pruned = prune_model(model, cfg)
    path = save_pretrained(pruned, dst, format=fmt, dtype=dtype, overwrite=overwrite)
    src = as_path(src)
    for directory in (src, src.parent):
        if (directory / TOKENIZER).is_file() and not (as_path(path) / TOKENIZER).exists():
            shutil.copyfile(directory / TOKENIZER, as_path(path) / TOKENIZER)
            break
    return PruneResult(path, cfg.method, model.cfg, pruned.cfg, projection_sparsity(nnx.state(model, nnx.Param)),
                       projection_sparsity(nnx.state(pruned, nnx.Param)))
