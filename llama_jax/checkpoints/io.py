"""`load_pretrained` / `save_pretrained`: detect a checkpoint's format and dispatch to its reader or writer.

Each format supplies a detector, a reader returning `(LlamaConfig, tensor getter by Meta name)` and a writer taking
Meta-named tensors (see `layout.py`), so every format shares one model <-> tensor mapping.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from jax.sharding import Mesh

from llama_jax.checkpoints import hf, llama2c, meta, orbax_format
from llama_jax.checkpoints.layout import TensorGetter, build_model, iter_meta_tensors
from llama_jax.config import DTYPES, ConfigError, ExecutionConfig, LlamaConfig
from llama_jax.model import Llama
from llama_jax.paths import AnyPath, PathLike, as_path, is_remote
from llama_jax.quant import dequantized, is_quantized, requantize

Writer = Callable[..., None]


@dataclass(frozen=True)
class Format:
    name: str
    detect: Callable[[AnyPath], bool]
    read: Callable[[AnyPath], tuple[LlamaConfig, TensorGetter]]
    write: Writer
    restore: Callable[[AnyPath, ExecutionConfig, Mesh | None, LlamaConfig], Llama] | None = None  # direct, sharded
    remote: bool = False  # reads and writes gs:// (etc.) URIs through epath; other formats need local files


FORMATS: dict[str, Format] = {
    "hf": Format("hf", hf.is_hf_dir, hf.read_hf, hf.save_hf),
    "meta": Format("meta", meta.is_meta_dir, meta.read_meta, meta.save_meta),
    "llama2c": Format("llama2c", llama2c.is_llama2c, llama2c.read_llama2c, llama2c.save_llama2c),
    # Exports, training step directories and run directories (newest step) share this one format.
    "orbax": Format("orbax", orbax_format.is_param_dir, orbax_format.read_orbax, orbax_format.save_orbax,
                    orbax_format.restore_orbax, remote=True),
}


def _local_only(path: PathLike) -> ValueError:
    local = sorted(name for name, fmt in FORMATS.items() if not fmt.remote)
    return ValueError(f"'{path}' is not a llama_jax run or orbax checkpoint, and the {'/'.join(local)} formats read "
                      "and write local paths only; copy it to local disk first (e.g. gcloud storage cp -r)")


def detect_format(path: PathLike) -> str:
    """Name of the format stored at `path`, or a one-line error saying what was expected."""
    path = as_path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path '{path}' does not exist")
    for fmt in FORMATS.values():
        if (fmt.remote or not is_remote(path)) and fmt.detect(path):
            return fmt.name
    if is_remote(path):
        raise _local_only(path)
    raise ValueError(f"'{path}' is not a known checkpoint layout; expected one of {sorted(FORMATS)} "
                     "(e.g. an HF dir with config.json + *.safetensors)")


def load_pretrained(path: PathLike, mesh: Mesh | None = None, execution: ExecutionConfig | None = None, *,
                    dtype: str | None = None, max_seq_len: int | None = None, **execution_fields: Any) -> Llama:
    """Load a checkpoint of any known format into a `Llama`, optionally sharded onto `mesh`.

    Checkpoints store only the architecture, so how the model runs is chosen here: `execution` (default: float32,
    no remat, unrolled layers), with single fields overridden by keyword (`scan_layers=True`, `remat="full"`);
    `dtype` sets both parameter and compute dtype (e.g. "bfloat16"); `max_seq_len` changes the context.
    `quant="int8"` (or int4, `quant_group_size=...`) quantizes the projections as they load; without `execution`
    or `quant`, a quantized orbax checkpoint loads as stored and any other one as float.
    """
    fmt = FORMATS[detect_format(path)]
    path = as_path(path)
    if dtype is not None:
        check_dtype(dtype)
        execution_fields = {"param_dtype": dtype, "dtype": dtype, **execution_fields}
    if execution is None and "quant" not in execution_fields and fmt.name == "orbax":
        execution_fields = {**orbax_format.read_stored(path).quantization(), **execution_fields}
    execution = _execution(execution or ExecutionConfig(), execution_fields)
    cfg, get_tensor = fmt.read(path)
    if max_seq_len is not None:
        cfg = dataclasses.replace(cfg, max_seq_len=max_seq_len)
    if fmt.restore is not None:
        return fmt.restore(path, execution, mesh, cfg)
    model = build_model(cfg, dataclasses.replace(execution, quant="none"), get_tensor, mesh)
    return requantize(model, execution.quant, execution.quant_group_size)


def _execution(base: ExecutionConfig, fields: dict[str, Any]) -> ExecutionConfig:
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(ExecutionConfig)})
    if unknown:
        raise ConfigError(f"load_pretrained got unknown setting(s) {', '.join(unknown)}; execution settings are "
                          f"{[f.name for f in dataclasses.fields(ExecutionConfig)]}")
    return dataclasses.replace(base, **fields)


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype '{dtype}' is not one of {DTYPES}")


def save_pretrained(model: Llama, path: PathLike, format: str = "hf", dtype: str | None = None,
                    overwrite: bool = False, **options: Any) -> AnyPath:
    """Write `model` in `format`; refuses a non-empty directory unless `overwrite=True`.

    A quantized model (`llama_jax.quant`) is stored quantized as `orbax` (integers and scales as they are, `dtype`
    ignored) and dequantized for every other format."""
    if is_quantized(model):
        if format == "orbax":
            path = _output_dir(path, format, overwrite)
            orbax_format.save_model(model, path)
            return path
        model = dequantized(model)
    return write_tensors(model.cfg, iter_meta_tensors(model), path, format, dtype or model.execution.param_dtype,
                         overwrite, **options)


def write_tensors(cfg: LlamaConfig, tensors: Iterator[tuple[str, np.ndarray]], path: PathLike, format: str,
                  dtype: str, overwrite: bool = False, **options: Any) -> AnyPath:
    """Write Meta-named tensors in `format` to the directory `path` (created; refused if non-empty)."""
    if format not in FORMATS:
        raise ValueError(f"unknown format '{format}'; choose one of {sorted(FORMATS)}")
    check_dtype(dtype)
    unknown = sorted(set(options) - set(inspect.signature(FORMATS[format].write).parameters))
    if unknown:
        raise ValueError(f"format '{format}' has no option {', '.join(unknown)}; drop it or choose another format")
    path = _output_dir(path, format, overwrite)
    FORMATS[format].write(cfg, tensors, path, dtype, **options)
    return path


def _output_dir(path: PathLike, format: str, overwrite: bool) -> AnyPath:
    """The output directory for `format`, created; refused if it is remote for a local-only format, a file, or
    (unless `overwrite`) not empty."""
    path = as_path(path)
    if is_remote(path) and not FORMATS[format].remote:
        raise _local_only(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output '{path}' is a file; choose a directory path")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory '{path}' is not empty; choose another path or pass overwrite=True")
    path.mkdir(parents=True, exist_ok=True)
    return path
