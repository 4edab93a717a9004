"""A small trained-from-text sentencepiece tokenizer and a random tiny Llama for it, saved in HF format."""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from llama_jax import Llama, LlamaConfig, Tokenizer, save_pretrained

TEXT = [
    "The cat sat on the mat and looked at the dog.",
    "A question: what is two plus two? The answer is four.",
    "Paris is the capital of France; Rome is the capital of Italy.",
    "Water boils at one hundred degrees and freezes at zero.",
    "She sells sea shells by the sea shore, said the old sailor.",
    "Once upon a time there was a little robot who liked to read books.",
]


def make_tiny_lm(root: Path, max_seq_len: int = 128, seed: int = 0) -> tuple[Path, Path, Llama, Tokenizer]:
    """(HF checkpoint dir, tokenizer .model, the model, the tokenizer) under `root`."""
    tok = Tokenizer.train(iter(TEXT * 50), 320, root / "tok")
    cfg = LlamaConfig.preset("tiny", vocab_size=tok.vocab_size, max_seq_len=max_seq_len, dim=64, n_layers=2)
    model = Llama(cfg, rngs=nnx.Rngs(seed))
    save_pretrained(model, root / "hf", format="hf")
    return root / "hf", root / "tok.model", model, tok
