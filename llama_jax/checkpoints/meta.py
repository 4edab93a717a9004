"""Meta's original checkpoints: `params.json` + `consolidated.NN.pth`, one file per model-parallel rank.

Each rank holds a slice of every matrix along its model-parallel axis (rows for wq/wk/wv/w1/w3/output, columns
for wo/w2/tok_embeddings) and a copy of every norm. Reading concatenates one tensor's slices at a time from
memory-mapped shards, so memory stays near one tensor plus the pages the OS maps in; writing splits the same way.
Names and the (un-permuted) RoPE layout are already our canonical form (`layout.py`), so no permutation happens here.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

from llama_jax.config import LlamaConfig

if TYPE_CHECKING:
    import torch

PARAMS = "params.json"
_SHARD = re.compile(r"consolidated\.(\d+)\.pth")
_ROW_SPLIT = {"wq", "wk", "wv", "w1", "w3", "output"}
_COL_SPLIT = {"wo", "w2", "tok_embeddings"}


def _torch() -> Any:
    """torch, imported on first use: only Meta's `.pth` files need it (it is a convert extra, not a core dependency)."""
    try:
        return importlib.import_module("torch")
    except ImportError:
        raise ImportError("reading or writing Meta .pth checkpoints needs torch: pip install torch==2.13.0") from None


def split_axis(meta_name: str) -> int | None:
    """The model-parallel axis a tensor is split along, or None for replicated norms."""
    leaf = meta_name.split(".")[-2]
    return 0 if leaf in _ROW_SPLIT else 1 if leaf in _COL_SPLIT else None


def shard_files(path: Path) -> list[Path]:
    """`consolidated.00.pth ..` in rank order; a gap in the numbering is a one-line error naming the missing file."""
    ranks = sorted(int(m.group(1)) for f in path.iterdir() if (m := _SHARD.fullmatch(f.name)))
    missing = sorted(set(range(max(ranks, default=-1) + 1)) - set(ranks))
    if missing:
        raise FileNotFoundError(f"{path}: shard consolidated.{missing[0]:02d}.pth is missing "
                                f"(found ranks {ranks}); re-download the checkpoint")
    return [path / f"consolidated.{r:02d}.pth" for r in ranks]


def is_meta_dir(path: Path) -> bool:
    return path.is_dir() and (path / PARAMS).is_file() and any(_SHARD.fullmatch(f.name) for f in path.iterdir())


def _to_numpy(tensor: torch.Tensor, where: str) -> np.ndarray:
    """Zero-copy numpy view of a CPU tensor; bfloat16 is reinterpreted as ml_dtypes.bfloat16."""
    torch = _torch()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if tensor.dtype not in (torch.float16, torch.float32):
        raise ValueError(f"{where} has dtype {tensor.dtype}; only bfloat16, float16 and float32 are supported")
    return tensor.numpy()


class MetaReader:
    """Tensor getter by Meta name over memory-mapped shards (`torch.load(..., weights_only=True, mmap=True)`)."""

    def __init__(self, path: Path):
        self.files = shard_files(path)
        self.shards = [_torch().load(f, map_location="cpu", weights_only=True, mmap=True) for f in self.files]

    def shape(self, meta_name: str) -> tuple[int, ...]:
        axis = split_axis(meta_name)
        shapes = [tuple(self._slice(meta_name, i).shape) for i in range(len(self.shards))]
        if axis is None:
            return shapes[0]
        return tuple(sum(s[axis] for s in shapes) if a == axis else d for a, d in enumerate(shapes[0]))

    def _slice(self, meta_name: str, rank: int) -> torch.Tensor:
        if meta_name not in self.shards[rank]:
            raise ValueError(f"{self.files[rank]}: tensor '{meta_name}' is missing from the shard")
        return self.shards[rank][meta_name]

    def _array(self, meta_name: str, rank: int) -> np.ndarray:
        return _to_numpy(self._slice(meta_name, rank), f"{self.files[rank]}: tensor '{meta_name}'")

    def __call__(self, meta_name: str) -> np.ndarray:
        axis = split_axis(meta_name)
        if axis is None or len(self.shards) == 1:
            return self._array(meta_name, 0)
        parts = [self._array(meta_name, r) for r in range(len(self.shards))]
        for rank, part in enumerate(parts):
            other = [d for a, d in enumerate(part.shape) if a != axis]
            first = [d for a, d in enumerate(parts[0].shape) if a != axis]
            if part.ndim != 2 or other != first or part.dtype != parts[0].dtype:
                raise ValueError(f"tensor '{meta_name}': {self.files[rank].name} holds {part.dtype}{part.shape} "
                                 f"but {self.files[0].name} holds {parts[0].dtype}{parts[0].shape}; "
                                 f"shards split along axis {axis} must agree on the other axis and dtype")
        return np.concatenate(parts, axis=axis)


def config_from_params(path: Path, reader: MetaReader) -> LlamaConfig:
    """`params.json` -> LlamaConfig; `vocab_size: -1` (size set by the tokenizer) is read from the embedding."""
    raw = json.loads((path / PARAMS).read_text())
    try:
        fields = {k: raw[k] for k in ("dim", "n_layers", "n_heads")}
    except KeyError as err:
        raise ValueError(f"{path / PARAMS}: required key {err} is missing") from None
    for key in ("n_kv_heads", "head_dim", "multiple_of", "ffn_dim_multiplier", "norm_eps", "rope_theta",
                "max_seq_len"):
        if raw.get(key) is not None:
            fields[key] = raw[key]
    vocab = raw.get("vocab_size", -1)
    fields["vocab_size"] = vocab if vocab > 0 else reader.shape("tok_embeddings.weight")[0]
    return LlamaConfig(**fields)


def read_meta(path: Path) -> tuple[LlamaConfig, MetaReader]:
    reader = MetaReader(path)
    return config_from_params(path, reader), reader


def meta_params(cfg: LlamaConfig) -> dict[str, Any]:
    """Meta's params.json keys. An explicit FFN width is encoded with `multiple_of`/`ffn_dim_multiplier` so that
    Meta's own FeedForward formula reproduces it (round int(mult * 8d/3) up to a multiple of the width itself); a
    `head_dim` other than dim / n_heads (after head pruning) is written as an extra key that only we read."""
    multiple_of, multiplier = cfg.multiple_of, cfg.ffn_dim_multiplier
    if cfg.ffn_hidden_dim is not None:
        base = cfg.meta_ffn_base
        multiple_of = cfg.ffn_hidden_dim
        multiplier = None if base <= cfg.ffn_hidden_dim else cfg.ffn_hidden_dim / base
    params = dict(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                  vocab_size=cfg.vocab_size, multiple_of=multiple_of, ffn_dim_multiplier=multiplier,
                  norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta)
    if not cfg.derived_head_dim:  # pruned heads: Meta's own code derives dim / n_heads and cannot run this model
        params["head_dim"] = cfg.head_dim
    return params


def _check_divisible(cfg: LlamaConfig, num_shards: int) -> None:
    sizes = dict(n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, dim=cfg.dim, hidden_dim=cfg.hidden_dim,
                 vocab_size=cfg.vocab_size)
    bad = [f"{k}={v}" for k, v in sizes.items() if v % num_shards]
    if num_shards < 1 or bad:
        raise ValueError(f"cannot split into num_shards={num_shards}: {', '.join(bad) or 'must be >= 1'} "
                         "not divisible; choose a num_shards dividing all of them")


def save_meta(cfg: LlamaConfig, tensors: Iterator[tuple[str, np.ndarray]], path: Path, dtype: str,
              num_shards: int = 1) -> None:
    """Write `params.json` and `consolidated.NN.pth` (each rank's slices copied out, so no file holds a whole tensor).

    Meta's model has no tied classifier, so a tied model is written with `output.weight` = the embedding.
    """
    _check_divisible(cfg, num_shards)
    torch = _torch()
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    embedding = None
    for name, tensor in tensors:
        t = _to_torch(tensor).to(getattr(torch, dtype))
        if name == "tok_embeddings.weight" and cfg.tie_embeddings:
            embedding = t
        _split_into(shards, name, t)
    if embedding is not None:
        _split_into(shards, "output.weight", embedding)
    for rank, shard in enumerate(shards):
        torch.save(shard, path / f"consolidated.{rank:02d}.pth")
    (path / PARAMS).write_text(json.dumps(meta_params(cfg), indent=2))


def _to_torch(tensor: np.ndarray) -> torch.Tensor:
    """Inverse of `_to_numpy` (copying only read-only arrays, which torch cannot wrap)."""
    torch = _torch()
    array = np.asarray(tensor)
    if not array.flags.writeable:
        array = array.copy()
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _split_into(shards: list[dict[str, torch.Tensor]], name: str, tensor: torch.Tensor) -> None:
    axis = split_axis(name)
    pieces = [tensor] * len(shards) if axis is None else tensor.chunk(len(shards), dim=axis)
    for shard, piece in zip(shards, pieces):
        shard[name] = piece.clone()
