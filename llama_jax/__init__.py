"""llama_jax: LLaMA 2 in JAX/Flax NNX, from tokenizer to RLHF, on TPU pods, GPUs and CPUs."""

from llama_jax.config import Config, ConfigError, LlamaConfig, load_config
from llama_jax.model import KVCache, Llama

__all__ = ["Config", "ConfigError", "KVCache", "Llama", "LlamaConfig", "load_config"]
