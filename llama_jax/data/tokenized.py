"""Tokenization and packing: documents -> one token stream (EOS after each document) cut into windows.

The in-memory path caches a corpus's stream on disk; the streaming path packs the same way on the fly.

Alongside each token we keep the number of UTF-8 bytes of source text it covers (from sentencepiece's byte
offsets; 0 for EOS), so validation can report bits per byte exactly. The cache is keyed by (dataset, split, text
cut, tokenizer hash), written atomically, and memory-mapped, so reruns start fast and large corpora stay on disk.
Its meta.json records each file's SHA-256; a cache whose files no longer match (a disk error, a partial copy) is
rebuilt with a warning instead of feeding damaged tokens to training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from llama_jax.errors import warn
from llama_jax.tokenizer import Tokenizer

log = logging.getLogger(__name__)
FORMAT = "packed-v2"  # v2 adds the files' SHA-256
FILES = ("tokens.bin", "bytes.bin")
CHUNK_CHARS = 8_000_000


@dataclasses.dataclass(frozen=True)
class TokenStream:
    """A packed token stream and the source bytes each token covers (both memory-mapped, same length)."""

    tokens: np.ndarray
    nbytes: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)


def window_count(n_tokens: int, seq_len: int) -> int:
    """How many windows of `seq_len + 1` tokens, stride `seq_len`, fit in a stream of `n_tokens`."""
    return max(0, (n_tokens - 1) // seq_len)


def window(tokens: np.ndarray, index: int, seq_len: int, offset: int = 0) -> np.ndarray:
    """Window `index` of a packed stream: tokens [start, start + seq_len + 1) as int32, `start = offset + index *
    seq_len` (consecutive windows share one token, so every token but the first is a target exactly once)."""
    start = offset + index * seq_len
    return np.asarray(tokens[start:start + seq_len + 1], np.int32)


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.sp.serialized_model_proto()).hexdigest()[:16]


def document_ids(tokenizer: Tokenizer, text: str, ends: bool = True) -> np.ndarray:
    """Token ids of one document (or a piece of one), followed by EOS when it ends the document."""
    ids = tokenizer.sp.encode(text)  # one string: a list would start sentencepiece's thread pool per call (5x slower)
    return np.asarray(ids + [tokenizer.eos_id] if ends else ids, np.int32)


def encode_documents(tokenizer: Tokenizer, docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of `docs`, each followed by EOS, and the UTF-8 bytes each token covers."""
    ids: list[int] = []
    nbytes: list[int] = []
    for proto in tokenizer.sp.encode(docs, return_type="proto"):
        for piece in proto.pieces:
            ids.append(piece.id)
            nbytes.append(piece.end - piece.begin)
        ids.append(tokenizer.eos_id)
        nbytes.append(0)
    return np.asarray(ids, np.int64), np.asarray(nbytes, np.uint32)


def _chunks(docs: Iterable[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if size >= CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def token_stream(docs: Iterable[str], key: str, tokenizer: Tokenizer, cache_dir: Path) -> TokenStream:
    """The packed stream of `docs` (identified by `key`), tokenized once and then read from `cache_dir`."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", key)
    path = cache_dir / "tokens" / f"{name}-{tokenizer_hash(tokenizer)}"
    token_dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    if (path / "meta.json").exists() and not _intact(path):
        warn(log, f"token cache {path} is damaged or from an older version (its files do not match the SHA-256 "
                  "in meta.json); rebuilding it")
        shutil.rmtree(path, ignore_errors=True)
    if not (path / "meta.json").exists():
        _write(docs, key, tokenizer, path, token_dtype)
    count = json.loads((path / "meta.json").read_text())["tokens"]
    return TokenStream(np.memmap(path / "tokens.bin", token_dtype, "r", shape=(count,)),
                       np.memmap(path / "bytes.bin", np.uint32, "r", shape=(count,)))


def _sha256(file: Path) -> str:
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _intact(path: Path) -> bool:
    """True when meta.json is this format and every file hashes to what it records (one read of the cache)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        return meta.get("format") == FORMAT and all(_sha256(path / name) == meta["sha256"][name] for name in FILES)
    except (OSError, ValueError, KeyError):
        return False


def _write(docs: Iterable[str], key: str, tokenizer: Tokenizer, path: Path, token_dtype: np.dtype) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    count = text_bytes = 0
    with open(tmp / "tokens.bin", "wb") as tok_f, open(tmp / "bytes.bin", "wb") as bytes_f:
        for chunk in _chunks(docs):
            ids, nbytes = encode_documents(tokenizer, chunk)
            tok_f.write(ids.astype(token_dtype).tobytes())
            bytes_f.write(nbytes.tobytes())
            count += len(ids)
            text_bytes += int(nbytes.sum())
    if count == 0:
        shutil.rmtree(tmp)
        raise ValueError(f"data source {key} holds no text; check its name, split and text_feature")
    meta = {"format": FORMAT, "source": key, "tokenizer": tokenizer_hash(tokenizer), "tokens": count,
            "text_bytes": text_bytes, "sha256": {name: _sha256(tmp / name) for name in FILES}}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        tmp.rename(path)
    except OSError:  # another process finished the same cache first; its copy is identical
        shutil.rmtree(tmp)
