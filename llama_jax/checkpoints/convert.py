"""Checkpoint conversion between any two registered formats, streamed tensor by tensor.

No model is built: each Meta-named tensor is read, shape-checked and handed to the writer, so peak memory is what
the writer buffers (an HF shard, or the whole output for Meta's per-rank `.pth` files), not a model on top of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from llama_jax.checkpoints.io import FORMATS, detect_format, write_tensors
from llama_jax.checkpoints.layout import TensorGetter, check_shape, meta_names
from llama_jax.config import LlamaConfig
from llama_jax.paths import AnyPath, PathLike, absolute, as_path


def _checked(cfg: LlamaConfig, get_tensor: TensorGetter) -> Iterator[tuple[str, np.ndarray]]:
    for name in meta_names(cfg):
        tensor = get_tensor(name)
        check_shape(name, tensor, cfg)
        yield name, tensor


def convert(src: PathLike, dst: PathLike, format: str, dtype: str | None = None, overwrite: bool = False,
            **options: Any) -> AnyPath:
    """Convert the checkpoint at `src` (format detected) to `format` at `dst`; `dtype` defaults to the source's.

    `src` and `dst` may be local paths or URIs, as `load_pretrained` accepts them (formats that need local files
    say so in one line)."""
    if absolute(dst) == absolute(src):
        raise ValueError(f"output '{dst}' is the input checkpoint; write the conversion to another directory")
    cfg, get_tensor = FORMATS[detect_format(src)].read(as_path(src))
    if format not in FORMATS:
        raise ValueError(f"unknown format '{format}'; choose one of {sorted(FORMATS)}")
    dtype = dtype or np.dtype(get_tensor("norm.weight").dtype).name
    return write_tensors(cfg, _checked(cfg, get_tensor), dst, format, dtype, overwrite, **options)
