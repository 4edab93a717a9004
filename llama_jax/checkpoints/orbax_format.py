"""The llama_jax parameter format: one on-disk layout for `orbax` exports and for every training step directory.

A directory in this format holds two Orbax items:
- `model/` (JSON): `{"architecture": <LlamaConfig fields>, "scan_layers": bool, "param_dtype": str, "quant": str,
  "quant_group_size": int}` — the architecture plus how the stored tree is laid out, and nothing about training;
- `params/`: the model's parameters as a plain nested dict in the model's own layout (layers stacked on a leading
  axis when `scan_layers`; a quantized projection as `{"qvalue": int8 | int4, "scale": float}`, see
  `llama_jax.quant`).
A training step directory (`<run>/<step>/`) adds `opt_state/`, `meta/` and `config/` beside them, so one function
reads the model of an export, a step or a run directory (its newest step) and never parses training settings.
Restoring places every array straight into its sharding on a mesh and casts it to the requested dtype; asking for
the other `scan_layers` layout restacks the layers after reading; another `quant` dequantizes and/or quantizes after
reading (the stored integers and scales themselves come back bit for bit). Older layouts still load: exports with
`llama_config.json`, and run steps saved before `model/` existed (read from their config's model section).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from llama_jax.checkpoints.layout import TensorGetter, build_model, iter_meta_tensors, restack, restore_target
from llama_jax.config import ExecutionConfig, LlamaConfig, from_dict, stored_model_section
from llama_jax.errors import reading
from llama_jax.model import Llama
from llama_jax.paths import AnyPath, PathLike, absolute, as_path
from llama_jax.quant import requantize

MODEL = "model"
PARAMS = "params"
LEGACY_EXPORT_CONFIG = "llama_config.json"
LEGACY_RUN_CONFIG = "config"


@dataclass(frozen=True)
class StoredModel:
    """What a parameter directory holds: the architecture and the layout of its `params` tree."""

    cfg: LlamaConfig
    scan_layers: bool
    param_dtype: str
    variable_leaves: bool = False  # run steps saved before `model/` existed wrap each array as {"value": array}
    quant: str = "none"
    quant_group_size: int = 128

    def quantization(self) -> dict[str, Any]:
        """The stored quantization as execution fields."""
        return {"quant": self.quant, "quant_group_size": self.quant_group_size}


def model_item(cfg: LlamaConfig, execution: ExecutionConfig) -> dict[str, Any]:
    """The `model/` item written beside `params/` by exports and by training."""
    return {"architecture": cfg.to_dict(), "scan_layers": execution.scan_layers,
            "param_dtype": execution.param_dtype, "quant": execution.quant,
            "quant_group_size": execution.quant_group_size}


def read_json_item(path: AnyPath) -> Any:
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(absolute(path))


def step_dir(path: AnyPath) -> AnyPath:
    """`path` itself if it holds `params/`, else the newest step directory inside a training run directory."""
    if (path / PARAMS).is_dir():
        return path
    steps = sorted((int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / PARAMS).is_dir()),
                   reverse=True) if path.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"'{path}' holds no llama_jax parameters (expected params/ or <step>/params inside)")
    return path / str(steps[0])


def _has_model_description(path: AnyPath) -> bool:
    return (path / MODEL).is_dir() or (path / LEGACY_EXPORT_CONFIG).is_file() or (path / LEGACY_RUN_CONFIG).is_dir()


def is_param_dir(path: PathLike) -> bool:
    """True for an export, a training step directory or a run directory in this format (or an older one)."""
    try:
        return _has_model_description(step_dir(as_path(path)))
    except FileNotFoundError:
        return False


def read_stored(path: PathLike) -> StoredModel:
    """The architecture and parameter layout stored at `path` (an export, a step or a run directory)."""
    step = step_dir(as_path(path))
    if (step / MODEL).is_dir():
        with reading(step / MODEL, (ValueError, KeyError), "use another step or re-create it"):
            raw = read_json_item(step / MODEL)
            return StoredModel(from_dict(LlamaConfig, raw["architecture"], "model."), bool(raw["scan_layers"]),
                               str(raw["param_dtype"]), quant=str(raw.get("quant", "none")),
                               quant_group_size=int(raw.get("quant_group_size", 128)))
    if (step / LEGACY_EXPORT_CONFIG).is_file():
        cfg, execution = stored_model_section(json.loads((step / LEGACY_EXPORT_CONFIG).read_text()))
        return StoredModel(cfg, execution.scan_layers, execution.param_dtype)
    if (step / LEGACY_RUN_CONFIG).is_dir():
        section = read_json_item(step / LEGACY_RUN_CONFIG).get("model", {})
        cfg, execution = stored_model_section(section)
        return StoredModel(cfg, execution.scan_layers, execution.param_dtype, variable_leaves=True)
    raise FileNotFoundError(f"'{step}' has params/ but no model/ description; it was not written by llama_jax")


def _wrap(tree: Any) -> Any:
    return jax.tree.map(lambda leaf: {"value": leaf}, tree)


def _unwrap(tree: Any) -> Any:
    return jax.tree.map(lambda node: node["value"], tree, is_leaf=lambda node: isinstance(node, dict) and "value" in node)


def restore_params(path: PathLike, execution: ExecutionConfig, mesh: Mesh | None,
                   cfg: LlamaConfig | None = None, attach: Callable[[Llama], Llama] | None = None
                   ) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, parameters) of the model stored at `path`, laid out and typed as `execution` asks but quantized as
    stored, each array sharded as `mesh` places it (device 0 without a mesh). `cfg` may change non-shape fields
    (e.g. `max_seq_len`); `attach` adds the weights a training objective stored beside the model's
    (`restore_target`)."""
    step = step_dir(as_path(path))
    stored = read_stored(step)
    cfg = cfg or stored.cfg
    execution = dataclasses.replace(execution, **stored.quantization())
    graphdef, target = restore_target(cfg, execution, mesh, attach)
    _, as_stored = restore_target(cfg, dataclasses.replace(execution, scan_layers=stored.scan_layers), mesh, attach)
    tree = nnx.to_pure_dict(as_stored)
    with ocp.StandardCheckpointer() as checkpointer, reading(step / PARAMS, fix="use another step or re-create it"):
        if stored.variable_leaves:
            restored = _unwrap(checkpointer.restore(absolute(step / PARAMS), _wrap(tree)))
        else:
            restored = checkpointer.restore(absolute(step / PARAMS), tree)
    if stored.scan_layers != execution.scan_layers:
        shardings = jax.tree.map(lambda a: a.sharding, nnx.to_pure_dict(target))
        restored = jax.device_put(restack(restored, cfg.n_layers, execution.scan_layers), shardings)
    nnx.replace_by_pure_dict(target, restored)
    return graphdef, target


def restore_orbax(path: PathLike, execution: ExecutionConfig, mesh: Mesh | None,
                  cfg: LlamaConfig | None = None) -> Llama:
    """`load_pretrained` for this format: the model restored straight onto `mesh`, quantized as `execution` asks."""
    model = nnx.merge(*restore_params(path, execution, mesh, cfg))
    return requantize(model, execution.quant, execution.quant_group_size)


def read_orbax(path: PathLike) -> tuple[LlamaConfig, TensorGetter]:
    """Converter reader: the architecture and a Meta-named tensor getter (parameters restored on first use)."""
    stored = read_stored(path)

    @functools.cache
    def tensors() -> dict[str, np.ndarray]:
        return dict(iter_meta_tensors(restore_orbax(path, ExecutionConfig(param_dtype=stored.param_dtype), None)))

    return stored.cfg, lambda name: tensors()[name]


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
    """Write Meta-named tensors as a parameter directory (layers unstacked, `dtype` parameters). An existing one is
    replaced (`write_tensors` has already refused a non-empty directory unless told to overwrite)."""
    path = as_path(path)
    execution = ExecutionConfig(param_dtype=dtype)
    save_model(build_model(cfg, execution, _Stream(tensors)), path)


def save_model(model: Llama, path: AnyPath) -> None:
    """Write `model`'s parameters as they are (layout, dtype, quantized integers and scales) into `path`."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(absolute(path / PARAMS), nnx.to_pure_dict(nnx.state(model, nnx.Param)), force=True)
    ocp.Checkpointer(ocp.JsonCheckpointHandler()).save(absolute(path / MODEL), model_item(model.cfg, model.execution),
                                                       force=True)
