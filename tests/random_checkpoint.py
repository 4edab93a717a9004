"""A random-weight checkpoint written from NumPy through the library's writer: no torch, and no random-init compile
(an eager `Llama(...)` init costs seconds of op-by-op dispatch on CPU)."""

from pathlib import Path

import numpy as np

from llama_jax.checkpoints.io import write_tensors
from llama_jax.checkpoints.layout import meta_names, meta_shape
from llama_jax.config import LlamaConfig


def save_random_checkpoint(cfg: LlamaConfig, path: Path, format: str = "hf", seed: int = 0) -> Path:
    """Weights ~ N(0, 0.2²) (so logits reach several units and greedy choices depend on the context), norms 1."""
    rng = np.random.default_rng(seed)

    def tensor(name: str) -> np.ndarray:
        shape = meta_shape(name, cfg)
        if name.endswith("norm.weight"):
            return np.ones(shape, np.float32)
        return (0.2 * rng.standard_normal(shape)).astype(np.float32)

    return write_tensors(cfg, ((name, tensor(name)) for name in meta_names(cfg)), path, format, "float32")
