"""llama2.c's version-0 float32 checkpoint (what `run.c` reads) and its `tokenizer.bin`.

`model.bin`: a header of 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len; a
negative vocab_size means an unshared classifier follows), then float32 tensors grouped by kind and stacked over
layers: tok_emb, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, freq_cis_real, freq_cis_imag
(max_seq_len * head_dim/2 each), then wcls when unshared. Matrices are torch `(out, in)` row-major in Meta's RoPE
layout, i.e. exactly our canonical tensors. The file is grouped by kind, not by layer, so the writer collects
all tensors first (fine: the format is meant for small models).

Version 2 (what `runq.c` reads; written, not read): a 256-byte header (uint32 magic "ak42", int32 version 2, the 7
int32 above with a positive vocab_size, uint8 shared_classifier, int32 group_size, zeros), the float32 norms
(attention norms, ffn norms, final norm), then per tensor int8 values followed by one float32 scale per
`group_size` consecutive values (llama2.c's Q8_0: symmetric, scale = absmax / 127): tok_emb, wq, wk, wv, wo, w1, w2,
w3 (each stacked over layers, one tensor after another), then wcls when unshared. `runq` also quantizes the
activations to int8 at every matmul, so it is not weight-only like `execution.quant=int8`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import jax.numpy as jnp
import numpy as np
import sentencepiece as spm

from llama_jax.checkpoints.layout import meta_shape
from llama_jax.config import ConfigError, LlamaConfig
from llama_jax.quant import quantize_array
from llama_jax.rope import rope_inv_freq

MODEL = "model.bin"
TOKENIZER = "tokenizer.bin"
HEADER = 7 * 4
V2_HEADER = 256
_LAYER_KINDS = ["attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo", "ffn_norm",
                "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]


def _model_file(path: Path) -> Path:
    return path / MODEL if path.is_dir() else path


def _sections(cfg: LlamaConfig) -> tuple[list[str], list[str]]:
    """Meta names in file order before the freq_cis tables, and after them (the unshared classifier)."""
    layers = [f"layers.{i}.{kind}.weight" for kind in _LAYER_KINDS for i in range(cfg.n_layers)]
    return ["tok_embeddings.weight", *layers, "norm.weight"], [] if cfg.tie_embeddings else ["output.weight"]


def freq_cis(cfg: LlamaConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables `[max_seq_len, head_dim/2]` of Meta's RoPE (run.c skips them; v0 still stores them)."""
    inv_freq = np.asarray(rope_inv_freq(cfg.head_dim, cfg.rope_theta), np.float64)
    angles = np.outer(np.arange(cfg.max_seq_len), inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def header(cfg: LlamaConfig) -> np.ndarray:
    vocab = cfg.vocab_size if cfg.tie_embeddings else -cfg.vocab_size
    return np.array([cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, vocab, cfg.max_seq_len],
                    np.int32)


def save_llama2c(cfg: LlamaConfig, tensors: Iterator[tuple[str, np.ndarray]], path: Path, dtype: str,
                 tokenizer: str | Path | None = None, version: int = 0, group_size: int = 64) -> None:
    """Write `model.bin` (version 0: float32, the only dtype it has; version 2: int8 in groups of `group_size`, for
    `runq`) and, given a sentencepiece model, `tokenizer.bin`. The header has no head_dim (run.c uses
    dim / n_heads), so a head-pruned model is refused."""
    if version not in (0, 2):
        raise ValueError(f"llama2.c version {version} is not supported; write version 0 (float32) or 2 (int8)")
    if not cfg.derived_head_dim:
        raise ValueError(f"llama2.c's header cannot describe head_dim {cfg.head_dim} != dim / n_heads = "
                         f"{cfg.dim} / {cfg.n_heads} (heads were pruned); save as hf, meta or orbax instead")
    collected = {name: np.asarray(t, np.float32) for name, t in tensors}
    body, head = _sections(cfg)
    with open(path / MODEL, "wb") as f:
        if version == 2:
            _write_v2(f, cfg, collected, group_size)
        else:
            cos, sin = freq_cis(cfg)
            f.write(header(cfg).tobytes())
            for name in body:
                f.write(collected.pop(name).tobytes())
            f.write(cos.tobytes())
            f.write(sin.tobytes())
            for name in head:
                f.write(collected.pop(name).tobytes())
    if tokenizer is not None:
        save_tokenizer_bin(tokenizer, path / TOKENIZER)


def _write_v2(f: BinaryIO, cfg: LlamaConfig, tensors: dict[str, np.ndarray], group_size: int) -> None:
    """The version-2 body (see the module docstring); the group shrinks by halves until it divides `dim`, as
    llama2.c's exporter does."""
    while cfg.dim % group_size:
        group_size //= 2
    if cfg.hidden_dim % group_size:
        raise ValueError(f"llama2.c int8 groups of {group_size} do not divide hidden_dim {cfg.hidden_dim}; pass a "
                         "group_size that divides dim and hidden_dim")
    f.write(np.array([0x616B3432], np.uint32).tobytes() + np.array([2], np.int32).tobytes())
    f.write(np.abs(header(cfg)).tobytes() + np.uint8(cfg.tie_embeddings).tobytes() + np.int32(group_size).tobytes())
    f.write(bytes(V2_HEADER - f.tell()))
    layers = range(cfg.n_layers)
    for kind in ("attention_norm", "ffn_norm"):
        for i in layers:
            f.write(tensors.pop(f"layers.{i}.{kind}.weight").tobytes())
    f.write(tensors.pop("norm.weight").tobytes())
    kinds = ["attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
             "feed_forward.w3"]
    names = ["tok_embeddings.weight", *[f"layers.{i}.{kind}.weight" for kind in kinds for i in layers]]
    for name in names + _sections(cfg)[1]:
        groups = tensors.pop(name).reshape(-1, group_size)
        values, scales = quantize_array(jnp.asarray(groups.T), 0, 1, "int8", group_size)  # a column per group
        f.write(np.asarray(values).T.tobytes() + np.asarray(scales, np.float32).tobytes())


def save_tokenizer_bin(model_file: str | Path, out: Path) -> None:
    """llama2.c's tokenizer.bin of a sentencepiece model (pieces with spaces for its word-start marks)."""
    if not Path(model_file).is_file():
        raise FileNotFoundError(f"tokenizer model '{model_file}' does not exist; pass a sentencepiece .model file")
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    pieces = [sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8") for i in range(sp.get_piece_size())]
    write_tokenizer_bin(pieces, [sp.get_score(i) for i in range(len(pieces))], out)


def write_tokenizer_bin(pieces: list[bytes], scores: list[float], out: Path) -> None:
    """uint32 max_token_length, then per id float32 score, int32 length, the piece's bytes."""
    with open(out, "wb") as f:
        f.write(np.uint32(max(len(p) for p in pieces)).tobytes())
        for piece, score in zip(pieces, scores):
            f.write(np.float32(score).tobytes() + np.int32(len(piece)).tobytes() + piece)


def _read_header(file: Path) -> LlamaConfig | None:
    """The config a v0 file describes, or None when the header does not describe exactly this file's size."""
    if not file.is_file() or file.stat().st_size < HEADER:
        return None
    dim, hidden, layers, heads, kv_heads, vocab, seq = (int(x) for x in np.fromfile(file, np.int32, 7))
    if min(dim, hidden, layers, heads, kv_heads, abs(vocab), seq) <= 0 or dim % heads or heads % kv_heads:
        return None
    try:
        cfg = LlamaConfig(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads, vocab_size=abs(vocab),
                          ffn_hidden_dim=hidden, max_seq_len=seq, tie_embeddings=vocab > 0)
    except ConfigError:  # numbers no model has (e.g. an odd head_dim): not a llama2.c file
        return None
    return cfg if _offsets(cfg)[1] == file.stat().st_size else None


def _offsets(cfg: LlamaConfig) -> tuple[dict[str, tuple[int, tuple[int, ...]]], int]:
    """Byte offset and shape of every tensor by Meta name, and the total file size."""
    body, head = _sections(cfg)
    offsets, pos = {}, HEADER
    for name in body + ["freq_cis"] + head:
        shape = (2, cfg.max_seq_len, cfg.head_dim // 2) if name == "freq_cis" else meta_shape(name, cfg)
        offsets[name] = (pos, shape)
        pos += 4 * int(np.prod(shape))
    return offsets, pos


def is_llama2c(path: Path) -> bool:
    return _read_header(_model_file(path)) is not None


def read_llama2c(path: Path) -> tuple[LlamaConfig, "Llama2cReader"]:
    file = _model_file(path)
    cfg = _read_header(file)
    if cfg is None:
        raise ValueError(f"{file} is not a llama2.c v0 float32 checkpoint (header does not match the file size)")
    return cfg, Llama2cReader(file, cfg)


class Llama2cReader:
    """Tensor getter by Meta name over a memory-mapped `model.bin`."""

    def __init__(self, file: Path, cfg: LlamaConfig):
        self.data = np.memmap(file, np.uint8, mode="r")
        self.offsets = _offsets(cfg)[0]

    def __call__(self, meta_name: str) -> np.ndarray:
        start, shape = self.offsets[meta_name]
        return self.data[start:start + 4 * int(np.prod(shape))].view(np.float32).reshape(shape)
