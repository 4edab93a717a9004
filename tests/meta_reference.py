"""Meta-layout tensors and Meta checkpoints built from a transformers model with torch alone (independent of
llama_jax's writers): HF names mapped back to Meta's, q/k rows un-permuted, matrices split per model-parallel rank.
torch is imported inside the functions, like in hf_reference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM

_LAYER = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
          "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
          "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm",
          "post_attention_layernorm": "ffn_norm"}
_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
        "lm_head.weight": "output.weight"}
ROWS = ("wq", "wk", "wv", "w1", "w3", "output")
COLS = ("wo", "w2", "tok_embeddings")


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, dim = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, dim).transpose(1, 2).reshape(rows, dim)


def meta_state_dict(hf: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    c = hf.config
    out = {}
    for name, w in hf.state_dict().items():
        if name in _TOP:
            out[_TOP[name]] = w.clone()
            continue
        _, _, idx, rest = name.split(".", 3)
        kind = _LAYER[rest.removesuffix(".weight")]
        if kind == "attention.wq":
            w = _unpermute(w, c.num_attention_heads)
        elif kind == "attention.wk":
            w = _unpermute(w, c.num_key_value_heads)
        out[f"layers.{idx}.{kind}.weight"] = w.clone()
    if c.tie_word_embeddings:
        out.pop("output.weight", None)
    return out


def write_meta_checkpoint(hf: LlamaForCausalLM, path: Path, num_shards: int, dtype: torch.dtype | None = None,
                          vocab_from_tokenizer: bool = False) -> Path:
    """params.json + consolidated.NN.pth like Meta's release (plus a `rope.freqs` extra key per shard)."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    c = hf.config
    path.mkdir(parents=True)
    sd = meta_state_dict(hf)
    shards = [{"rope.freqs": torch.ones(c.hidden_size // c.num_attention_heads // 2)} for _ in range(num_shards)]
    for name, w in sd.items():
        leaf = name.split(".")[-2]
        pieces = (torch.chunk(w, num_shards, 0) if leaf in ROWS else
                  torch.chunk(w, num_shards, 1) if leaf in COLS else [w] * num_shards)
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.to(dtype).clone()
    for i, shard in enumerate(shards):
        torch.save(shard, path / f"consolidated.{i:02d}.pth")
    # intermediate_size 172 = Meta's formula with multiple_of 172 (int(8 * 64 / 3) = 170 rounds up to 172)
    params = dict(dim=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
                  n_kv_heads=c.num_key_value_heads, vocab_size=-1 if vocab_from_tokenizer else c.vocab_size,
                  multiple_of=c.intermediate_size, ffn_dim_multiplier=None, norm_eps=c.rms_norm_eps)
    (path / "params.json").write_text(json.dumps(params))
    return path
