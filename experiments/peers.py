"""What the benchmarks share: timing, device memory, and the HF transformers peer built on torch's best device."""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from llama_jax.config import LlamaConfig

GIB = 2**30
# Read when JAX's GPU backend starts (the first device query, after this import): without it JAX takes 75% of the
# GPU up front and the torch peer, which runs first, has no room.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def timed(step: Callable[[], Any], steps: int, warmup: int) -> float:
    """Seconds for `steps` calls after `warmup` untimed ones; `step` must block until its work is done."""
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - start


def jax_peak_gib() -> float | None:
    """Peak bytes in use on the first device since start (None where the backend does not count, e.g. CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / GIB if "peak_bytes_in_use" in stats else None


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the inference benchmarks that time random-weight presets, optionally through the engine."""
    parser.add_argument("--models", default="stories15m,stories110m", help="comma-separated LlamaConfig presets")
    parser.add_argument("--layers", type=int, help="override each preset's layer count")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the compiling one (best is kept)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and compute")
    parser.add_argument("--tokenizer", help="sentencepiece .model: also time the server's engine (sets the vocabulary)")
    parser.add_argument("--json", help="append each result as a JSON line to this file")


def presets(parser: argparse.ArgumentParser, args: argparse.Namespace,
            vocab_size: int | None) -> list[tuple[str, LlamaConfig]]:
    """`--models` as configs (`--layers` and the tokenizer's vocabulary applied); an unknown one is a usage error."""
    overrides = {k: v for k, v in (("n_layers", args.layers), ("vocab_size", vocab_size)) if v is not None}
    configs = []
    for preset in args.models.split(","):
        try:
            configs.append((preset, LlamaConfig.preset(preset, **overrides)))
        except ValueError as err:
            parser.error(str(err))
    return configs


def record(path: str | None, **row: Any) -> None:
    """Append one result as a JSON line (how `gpu_check.sh` collects its table)."""
    if path:
        with Path(path).open("a") as f:
            f.write(json.dumps(row) + "\n")


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def hf_model(cfg: LlamaConfig, dtype: str, device: str) -> Any:
    """LlamaForCausalLM (sdpa attention) of `cfg`'s shape with random weights, created directly on `device`."""
    import torch
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    hf_cfg = HFConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
                      num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                      num_key_value_heads=cfg.n_kv_heads, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                      max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings,
                      attn_implementation="sdpa")
    with torch.device(device):
        return LlamaForCausalLM(hf_cfg).to(getattr(torch, dtype))


def torch_sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def torch_peak_gib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / GIB if device == "cuda" else None


def releasing_torch(bench: Callable[..., Any]) -> Callable[..., Any]:
    """Run a torch benchmark, then hand torch's cached device memory back before JAX allocates (the benchmark's
    models are gone with its frame by then)."""

    @functools.wraps(bench)
    def run(*args: Any, **kwargs: Any) -> Any:
        import torch

        try:
            return bench(*args, **kwargs)
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    return run


def measured_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of a jitted elementwise pass over `gib` of float32 (bytes read + written), best of `repeats`."""
    holder = {"x": jax.random.normal(jax.random.key(0), (int(gib * GIB) // 4,), jax.numpy.float32)}
    nbytes = holder["x"].nbytes
    step = jax.jit(lambda a: a * 1.0001, donate_argnums=0)  # in place: no fresh pages to fault in on CPU

    def one() -> None:
        holder["x"] = step(holder["x"]).block_until_ready()

    one()
    return 2 * nbytes / min(timed(one, 1, 0) for _ in range(repeats))
