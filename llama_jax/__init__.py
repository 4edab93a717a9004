"""llama_jax: LLaMA 2 in JAX/Flax NNX, from tokenizer to RLHF, on TPU pods, GPUs and CPUs."""

from llama_jax.platforms import choose_platforms

choose_platforms()  # before any JAX backend starts: keeps libtpu from loading where there is no TPU

from llama_jax.config import Config, ConfigError, LlamaConfig, load_config
from llama_jax.model import KVCache, Llama
from llama_jax.tokenizer import Tokenizer
from llama_jax.checkpoints import load_pretrained, save_pretrained
from llama_jax.inference.generate import generate
from llama_jax.inference.prefix_cache import PrefixCache
from llama_jax.inference.text import generate_text

__all__ = ["Config", "ConfigError", "KVCache", "Llama", "LlamaConfig", "PrefixCache", "Tokenizer", "generate", "generate_text", "load_config", "load_pretrained", "save_pretrained"]
