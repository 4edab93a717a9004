"""Checkpoint formats: Hugging Face, Meta, llama2.c and our Orbax checkpoints."""

from llama_jax.checkpoints.io import FORMATS, detect_format, load_pretrained, save_pretrained

__all__ = ["FORMATS", "detect_format", "load_pretrained", "save_pretrained"]
