"""LoRA adapters in Hugging Face PEFT's format (`adapter_config.json` + `adapter_model.safetensors`), and `merge`.

PEFT stores, per adapted `nn.Linear` of the HF model, `lora_A.weight: [r, in]` and `lora_B.weight: [out, r]` with
`W' = W + lora_alpha / r * B @ A`. Our adapters hold `A: [*in, r]`, `B: [r, *out]` on Meta-layout weights, so A and B
are flattened and transposed, and for q/k the output rows of B get HF's rotate-half permutation, exactly as the
base weights do in `hf.py` (the permutation acts on output rows only, so it commutes with the product).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors.numpy import load_file, save_file

from llama_jax import lora
from llama_jax.checkpoints.hf import rope_permute, hf_name
from llama_jax.checkpoints.io import FORMATS, detect_format, load_pretrained, save_pretrained
from llama_jax.config import LlamaConfig, LoraConfig
from llama_jax.model import Llama
from llama_jax.paths import AnyPath, PathLike, as_path

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _heads(short: str, cfg: LlamaConfig) -> int | None:
    return {"q": cfg.n_heads, "k": cfg.n_kv_heads}.get(short)


def _module_name(layer: int, short: str) -> str:
    module, param = lora.TARGETS[short]
    return PREFIX + hf_name(f"layers.{layer}.{module}.{param}.weight").removesuffix(".weight")


def _per_layer(model: Llama) -> list[tuple[int, str, np.ndarray, np.ndarray, float]]:
    """(layer, short name, A, B, scale) for every adapter, unstacked, as float32 numpy."""
    out = []
    for layer, short, _, _, adapter in lora.adapters(model):
        a, b = (np.asarray(multihost_utils.process_allgather(x[...], tiled=True), np.float32)
                for x in (adapter.a, adapter.b))
        layers = range(model.cfg.n_layers) if layer is None else [layer]
        for i in layers:
            out.append((i, short, a[i] if layer is None else a, b[i] if layer is None else b, adapter.scale))
    return out


def save_peft(model: Llama, cfg: LoraConfig, path: PathLike) -> AnyPath:
    """Write `model`'s adapters as a PEFT LoRA adapter directory for the HF export of its base.

    In a multi-process run every process must call this: the adapters, sharded over all processes' devices, are
    gathered to each (a collective), and process 0 alone writes the files.
    """
    path = as_path(path)
    tensors = {}
    for layer, short, a, b, _ in _per_layer(model):
        rank = a.shape[-1]
        lora_a = a.reshape(-1, rank).T
        lora_b = b.reshape(rank, -1).T
        heads = _heads(short, model.cfg)
        if heads:
            lora_b = rope_permute(lora_b, heads, inverse=False)
        name = _module_name(layer, short)
        tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(lora_a)
        tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(lora_b)
    targets = lora.resolve_targets(cfg.targets)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
              "lora_dropout": cfg.dropout, "target_modules": sorted(lora.PEFT_MODULES[t] for t in targets),
              "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False,
              "base_model_name_or_path": None, "modules_to_save": None}
    if jax.process_index() != 0:
        return path
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})
    (path / CONFIG).write_text(json.dumps(config, indent=2))
    return path


def read_peft_config(path: PathLike) -> LoraConfig:
    """The LoRA settings stored with an adapter (rank, alpha, dropout, targets)."""
    file = as_path(path) / CONFIG
    if not file.exists():
        raise FileNotFoundError(f"no {CONFIG} in '{path}'; give a PEFT LoRA adapter directory")
    raw = json.loads(file.read_text())
    if raw.get("peft_type") != "LORA" or raw.get("use_rslora") or raw.get("use_dora"):
        raise ValueError(f"{file}: only plain LoRA adapters are supported (peft_type LORA, no rslora/dora)")
    targets = raw["target_modules"]
    targets = [targets] if isinstance(targets, str) else list(targets)
    return LoraConfig(rank=int(raw["r"]), alpha=float(raw["lora_alpha"]), dropout=float(raw.get("lora_dropout", 0)),
                      targets=targets)


def load_peft(model: Llama, path: PathLike) -> Llama:
    """Attach the PEFT adapter at `path` to `model` (in place) and return it."""
    cfg = read_peft_config(path)
    lora.attach(model, cfg, nnx.Rngs(0))
    tensors = load_file(str(Path(as_path(path)) / WEIGHTS))
    for layer, short, _, _, adapter in list(lora.adapters(model)):
        layers = range(model.cfg.n_layers) if layer is None else [layer]
        pairs = [_from_peft(tensors, i, short, adapter, model.cfg) for i in layers]
        a, b = (np.stack(x) for x in zip(*pairs)) if layer is None else pairs[0]
        adapter.a[...], adapter.b[...] = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return model


def _from_peft(tensors: dict[str, np.ndarray], layer: int, short: str, adapter: Any,
               cfg: LlamaConfig) -> tuple[np.ndarray, np.ndarray]:
    name = _module_name(layer, short)
    if f"{name}.lora_A.weight" not in tensors:
        raise ValueError(f"adapter has no tensor '{name}.lora_A.weight' although its config targets it")
    lora_a, lora_b = tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"]
    heads = _heads(short, cfg)
    if heads:
        lora_b = rope_permute(lora_b, heads, inverse=True)
    stacked = lora.is_stacked(adapter)
    a_shape = adapter.a.shape[1:] if stacked else adapter.a.shape
    b_shape = adapter.b.shape[1:] if stacked else adapter.b.shape
    return lora_a.T.reshape(a_shape), lora_b.T.reshape(b_shape)


def merge_adapter(base: PathLike, adapter: PathLike, output: PathLike, format: str = "hf", dtype: str | None = None,
                  overwrite: bool = False) -> AnyPath:
    """Fold the PEFT adapter at `adapter` into the checkpoint `base` (any format) and write a full checkpoint in
    `format`, in `dtype` (default: the base's). The sum is formed in float32."""
    if dtype is None:
        get_tensor = FORMATS[detect_format(base)].read(as_path(base))[1]
        dtype = np.dtype(get_tensor("norm.weight").dtype).name
    model = lora.merge(load_peft(load_pretrained(base, dtype="float32"), adapter))
    return save_pretrained(model, output, format, dtype, overwrite)
