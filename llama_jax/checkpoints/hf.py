"""Hugging Face LLaMA directories (`config.json` + `*.safetensors`, single file or sharded with an index).

HF stores q/k projections with rows permuted for its rotate-half RoPE; we keep Meta's adjacent-pair layout, so
loading un-permutes (`view(n, 2, hd/2, dim).transpose(1, 2)`) and saving permutes back. GQA needs nothing extra:
k/v rows already hold `n_kv_heads * head_dim` outputs in head order.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.flax import save_file

from llama_jax.config import LlamaConfig
from llama_jax.errors import reading

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
SHARD_BYTES = 2 * 1024**3

_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}


def is_hf_dir(path: Path) -> bool:
    return (path / CONFIG).is_file() and ((path / SINGLE).is_file() or (path / INDEX).is_file())


def hf_name(meta_name: str) -> str:
    """'layers.3.attention.wq.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    stem = meta_name.removesuffix(".weight")
    if stem.startswith("layers."):
        _, idx, rest = stem.split(".", 2)
        return f"model.layers.{idx}.{_LAYER_NAMES[rest]}.weight"
    return f"{_TOP_NAMES[stem]}.weight"


def rope_permute(w: Any, n_heads: int, inverse: bool) -> Any:
    rows, dim = w.shape
    half = rows // n_heads // 2
    shape = (n_heads, 2, half, dim) if inverse else (n_heads, half, 2, dim)
    return w.reshape(shape).swapaxes(1, 2).reshape(rows, dim)


def _head_count(meta_name: str, cfg: LlamaConfig) -> int | None:
    if meta_name.endswith("attention.wq.weight"):
        return cfg.n_heads
    if meta_name.endswith("attention.wk.weight"):
        return cfg.n_kv_heads
    return None


def _reading(file: Path) -> contextlib.AbstractContextManager[None]:
    return reading(file, (SafetensorError, json.JSONDecodeError), "re-download or re-convert the checkpoint")


def config_from_hf(path: Path) -> LlamaConfig:
    """Read `config.json`; a non-LLaMA model is a one-line error."""
    with _reading(path / CONFIG):
        try:
            return _config_from_hf(path)
        except KeyError as err:
            raise ValueError(f"{path / CONFIG} lacks {err}; re-download the checkpoint's config.json") from None


def _config_from_hf(path: Path) -> LlamaConfig:
    raw = json.loads((path / CONFIG).read_text())
    if raw.get("model_type") != "llama":
        raise ValueError(f"{path / CONFIG}: model_type is {raw.get('model_type')!r}, not 'llama'; "
                         "only LLaMA checkpoints can be loaded")
    rope = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default" or scaling:
        raise ValueError(f"{path / CONFIG}: RoPE scaling {rope or scaling} is not LLaMA 2's; it is not supported")
    dim, heads = raw["hidden_size"], raw["num_attention_heads"]
    cfg = dict(dim=dim, n_layers=raw["num_hidden_layers"], n_heads=heads,
               n_kv_heads=raw.get("num_key_value_heads") or heads, vocab_size=raw["vocab_size"],
               norm_eps=raw.get("rms_norm_eps", 1e-5), rope_theta=rope.get("rope_theta", raw.get("rope_theta", 1e4)),
               max_seq_len=raw.get("max_position_embeddings", 4096),
               tie_embeddings=bool(raw.get("tie_word_embeddings", False)), head_dim=raw.get("head_dim"))
    derived = LlamaConfig(**cfg)
    if derived.hidden_dim != raw["intermediate_size"]:
        cfg["ffn_hidden_dim"] = raw["intermediate_size"]
    return LlamaConfig(**cfg)


def read_hf(path: Path) -> tuple[LlamaConfig, "HFReader"]:
    cfg = config_from_hf(path)
    return cfg, HFReader(path, cfg)


class HFReader:
    """Lazy tensor access by Meta name over one or many safetensors files."""

    def __init__(self, path: Path, cfg: LlamaConfig):
        self.path, self.cfg = path, cfg
        if (path / INDEX).is_file():
            with _reading(path / INDEX):
                self.files = {k: path / v for k, v in json.loads((path / INDEX).read_text())["weight_map"].items()}
        else:
            with _reading(path / SINGLE), safe_open(path / SINGLE, framework="flax") as f:
                self.files = {k: path / SINGLE for k in f.keys()}

    @staticmethod
    def file_name(meta_name: str) -> str:
        return hf_name(meta_name)

    def __call__(self, meta_name: str) -> np.ndarray:
        name = hf_name(meta_name)
        if name not in self.files:
            raise ValueError(f"{self.path}: tensor '{name}' is missing from the checkpoint")
        file = self.files[name]
        if not file.is_file():
            raise FileNotFoundError(f"{file} is listed in {INDEX} but missing; re-download the checkpoint")
        with _reading(file), safe_open(file, framework="flax") as f:
            tensor = f.get_tensor(name)
        heads = _head_count(meta_name, self.cfg)
        return rope_permute(tensor, heads, inverse=True) if heads else tensor


def hf_config_dict(cfg: LlamaConfig, dtype: str) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": dtype, "dtype": dtype,
    }


def save_hf(cfg: LlamaConfig, tensors: Iterator[tuple[str, np.ndarray]], path: Path, dtype: str) -> None:
    """Write `config.json` and safetensors shards of at most SHARD_BYTES (streamed), indexed when there are several."""
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, Any] = {}
    size = 0
    for meta_name, tensor in tensors:
        heads = _head_count(meta_name, cfg)
        array = jnp.asarray(rope_permute(tensor, heads, inverse=False) if heads else tensor, dtype)
        if shard and size + array.nbytes > SHARD_BYTES:
            written.append(_write_part(shard, path, len(written)))
            shard, size = {}, 0
        shard[hf_name(meta_name)] = array
        size += array.nbytes
    written.append(_write_part(shard, path, len(written)))
    count = len(written)
    weight_map = {}
    for i, (part, keys) in enumerate(written):
        final = SINGLE if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        part.rename(path / final)
        weight_map.update({k: final for k in keys})
    if count > 1:
        (path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    (path / CONFIG).write_text(json.dumps(hf_config_dict(cfg, dtype), indent=2))


def _write_part(shard: dict[str, Any], path: Path, index: int) -> tuple[Path, list[str]]:
    part = path / f"part-{index:05d}.safetensors.tmp"
    save_file(shard, str(part), metadata={"format": "pt"})
    return part, list(shard)
