"""Our own pretrained-weights format: `llama_config.json` (every LlamaConfig field) + `params/` (an Orbax
StandardCheckpointer save of the parameter tree in the model's layout, layers unstacked).

Because the stored tree is the model's own, `restore_orbax` restores every array straight into its sharding on a
mesh (no host copy of the whole model); a `scan_layers=True` request goes through the generic Meta-tensor path.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from llama_jax.checkpoints.layout import build_model, restore_target, to_meta_layout
from llama_jax.config import LlamaConfig
from llama_jax.model import Llama
from llama_jax.paths import AnyPath, PathLike, absolute, as_path

CONFIG = "llama_config.json"
PARAMS = "params"


def is_orbax_dir(path: PathLike) -> bool:
    path = as_path(path)
    return (path / CONFIG).is_file() and (path / PARAMS).is_dir()


def _stored_config(cfg: LlamaConfig, dtype: str) -> LlamaConfig:
    return dataclasses.replace(cfg, scan_layers=False, remat="none", param_dtype=dtype)


def _restore(path: AnyPath, cfg: LlamaConfig, mesh: Mesh | None) -> tuple[Any, Any]:
    """(graphdef, param state) of `cfg` restored from `path/params`, each array placed as `mesh` shards it."""
    graphdef, abstract = restore_target(cfg, mesh)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(absolute(path / PARAMS), nnx.to_pure_dict(abstract))
    nnx.replace_by_pure_dict(abstract, restored)
    return graphdef, abstract


def restore_orbax(path: PathLike, cfg: LlamaConfig, mesh: Mesh | None) -> Llama | None:
    """The model restored directly (sharded on `mesh`), or None when `cfg` stacks layers unlike the stored tree."""
    if cfg.scan_layers:
        return None
    return nnx.merge(*_restore(as_path(path), cfg, mesh))


class OrbaxReader:
    """Tensor getter by Meta name; restores the stored tree once, on first use."""

    def __init__(self, path: AnyPath, cfg: LlamaConfig):
        self.path, self.cfg, self.tree = path, cfg, None

    def __call__(self, meta_name: str) -> np.ndarray:
        if self.tree is None:
            self.tree = nnx.to_pure_dict(_restore(self.path, self.cfg, None)[1])
        node = self.tree
        for part in meta_name.split("."):
            if not isinstance(node, dict):
                break
            node = node[int(part) if part.isdigit() else part]
        return np.asarray(to_meta_layout(meta_name, node, self.cfg))


def read_orbax(path: PathLike) -> tuple[LlamaConfig, OrbaxReader]:
    path = as_path(path)
    try:
        cfg = LlamaConfig(**json.loads((path / CONFIG).read_text()))
    except TypeError as err:
        raise ValueError(f"{path / CONFIG} is not a LlamaConfig: {err}") from None
    return cfg, OrbaxReader(path, cfg)


class _Stream:
    """Getter over a tensor stream: tensors that arrive before they are asked for wait in a stash (at most about
    one layer plus the embedding, since the stream and the model visit layers in the same order)."""

    def __init__(self, tensors: Iterator[tuple[str, np.ndarray]]):
        self.tensors, self.stash = tensors, {}

    def __call__(self, meta_name: str) -> np.ndarray:
        while meta_name not in self.stash:
            name, tensor = next(self.tensors)
            self.stash[name] = tensor
        return self.stash.pop(meta_name)


def save_orbax(cfg: LlamaConfig, tensors: Iterator[tuple[str, np.ndarray]], path: PathLike, dtype: str) -> None:
    path = as_path(path)
    stored = _stored_config(cfg, dtype)
    model = build_model(stored, _Stream(tensors))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(absolute(path / PARAMS), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    (path / CONFIG).write_text(json.dumps(dataclasses.asdict(stored), indent=2))
