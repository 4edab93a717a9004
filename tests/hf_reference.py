"""Random-weight transformers LLaMA models used as the independent reference in tests (marked `torch_ref`).

torch and transformers are imported inside the functions, so test modules import this file even where torch is not
installed and `-m "not torch_ref"` deselects the tests that would call it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM


def make_hf_model(vocab: int = 128, dim: int = 64, ffn: int = 172, layers: int = 2, heads: int = 4,
                  kv_heads: int = 2, tie: bool = False, seed: int = 0) -> LlamaForCausalLM:
    import torch
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = HFConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=ffn, num_hidden_layers=layers,
                   num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=1e-5,
                   rope_theta=10000.0, initializer_range=0.2, tie_word_embeddings=tie,
                   attn_implementation="eager")
    return LlamaForCausalLM(cfg).eval()


def save_hf_model(model: LlamaForCausalLM, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


def hf_logits(model: LlamaForCausalLM, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()
