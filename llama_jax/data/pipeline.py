"""Training and validation batches: packed token windows, shuffled, mixed, sharded per process, checkpointable.

Each source's packed token stream is cut into windows of `seq_len + 1` tokens with stride `seq_len` (consecutive
windows share one token), so every token but the first is a target exactly once and only the tail is dropped.
Everything is a random-access grain `MapDataset`: windows are shuffled globally per source (a fresh permutation
each epoch), sources are interleaved in proportion to their weights, and global window j goes to process
j % process_count. Global batch k is the same whatever the process count, so the position — grain's
`{"next_index": k}` — is a tiny JSON-able state that resumes bit-identically, even on a different topology.
With `data.streaming` the training windows come from `streaming.py` instead (nothing is tokenized up front); both
paths share the tokenizer and `tokenized.window`, and batches reach the devices through the same `DataIterator`.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import re
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from llama_jax.config import Config, ConfigError, DataConfig, DataSource
from llama_jax.data.shards import HF_PREFIX, source_documents
from llama_jax.data.sources import cache_root, documents, is_local, open_source, source_id
from llama_jax.data.streaming import host_dataset, host_state, split_state
from llama_jax.data.tokenized import TokenStream, token_stream, tokenizer_hash, window, window_count
from llama_jax.paths import PathLike, as_path, is_remote, local_copy_path
from llama_jax.sharding import batch_sharding
from llama_jax.tokenizer import Tokenizer

Batch = dict[str, Any]
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
TOKENIZER_SAMPLE_DOCS = 200_000


def windows(stream: TokenStream, seq_len: int, order: grain.MapDataset, with_bytes: bool = False,
            source: int = 0, shifts: tuple[int, int] | None = None) -> grain.MapDataset:
    """Map window indices (`order`) to `{"tokens": int32[seq_len + 1], "source": int32}`, plus the target tokens'
    text bytes. With `shifts = (seed, windows per epoch)`, epoch e's windows start `_seed(seed, e) % seq_len`
    tokens later (`order` must leave room for that last shift)."""
    def read(position: int, i: int) -> Batch:
        offset = 0 if shifts is None else _seed(shifts[0], position // shifts[1]) % seq_len
        out = {"tokens": window(stream.tokens, int(i), seq_len, offset), "source": np.int32(source)}
        if with_bytes:
            start = offset + int(i) * seq_len
            out["target_bytes"] = np.int32(stream.nbytes[start + 1:start + seq_len + 1].sum())
        return out
    return order.map_with_index(read)


def _seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _local_batch(batch_size: int, process_count: int) -> int:
    if batch_size <= 0 or batch_size % process_count:
        raise ConfigError(f"batch size {batch_size} must be a positive multiple of the {process_count} processes")
    return batch_size // process_count


def process_slot(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} is outside 0..{count - 1}")
    return index, count


def global_batch(batch: Batch, mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each process's numpy batch into global arrays split over the mesh's batch axes (data, fsdp)."""
    out = {}
    for key, local in batch.items():
        shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
        sharding = batch_sharding(mesh, shape)
        if jax.process_count() > 1 and sharding.spec[0] is None:
            raise ConfigError(f"global batch {shape[0]} must be divisible by mesh data*fsdp for multi-process runs")
        out[key] = jax.make_array_from_process_local_data(sharding, local, shape)
    return out


def _put(mesh: Mesh | None, batch: Batch) -> Batch:
    """The batch as global arrays on `mesh` (this runs in the prefetch thread), its source indices kept on the host."""
    batch = dict(batch)
    source = batch.pop("source")
    return {**(global_batch(batch, mesh) if mesh is not None else batch), "source": source}


class DataIterator:
    """Batches from a grain dataset, put onto the mesh in a background thread one step ahead of the train step.

    `state()`/`restore()` save and resume the exact position. Rows carry their source index, which is counted
    (tokens seen per source, `metrics()`) and not sent to the devices.
    """

    def __init__(self, dataset: grain.IterDataset, mesh: Mesh | None, fingerprint: str, labels: list[str],
                 seq_len: int):
        put = functools.partial(_put, mesh)  # not a bound method: the iterator must not keep `self` alive
        self._iter = iter(grain.experimental.ThreadPrefetchIterDataset(dataset.map(put), prefetch_buffer_size=2))
        weakref.finalize(self, self._iter.close)  # threads still running C++ code abort the interpreter at exit
        self.fingerprint_of = fingerprint
        self._labels = labels
        self._seq_len = seq_len
        self._tokens = np.zeros(len(labels), np.int64)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batch = next(self._iter)
        source = batch.pop("source")
        self._tokens += np.bincount(source, minlength=len(self._labels)) * self._seq_len * jax.process_count()
        return batch

    def close(self) -> None:
        """Stop the background threads (and worker processes)."""
        self._iter.close()

    def metrics(self) -> dict[str, float]:
        """Target tokens seen per source so far (this process's rows times the process count)."""
        return {f"tokens_seen/{label}": float(n) for label, n in zip(self._labels, self._tokens)}

    def state(self) -> dict[str, Any]:
        """A small JSON-able dict: the data configuration's fingerprint, the position and the tokens seen."""
        return {"fingerprint": self.fingerprint_of, "position": self._iter.get_state(), "tokens": self._tokens.tolist()}

    def restore(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self.fingerprint_of:
            raise ValueError("data state was saved with different data settings (sources, weights, seq_len, seed, "
                             "batch size or tokenizer); restore with the original settings")
        self._iter.set_state(state["position"])
        self._tokens = np.asarray(state.get("tokens", self._tokens), np.int64)


class StreamingDataIterator(DataIterator):
    """A `DataIterator` whose position differs per process: `state()` gathers every process's (at checkpoints
    only), and `restore()` regroups them by stream when the process count changed."""

    def __init__(self, dataset: grain.IterDataset, mesh: Mesh | None, fingerprint: str, labels: list[str],
                 seq_len: int, data: DataConfig, batch_size: int, process_index: int, process_count: int):
        super().__init__(dataset, mesh, fingerprint, labels, seq_len)
        self._data = data
        self._batch_size = batch_size
        self._index = process_index
        self._count = process_count
        self._batches = 0

    def __next__(self) -> Batch:
        batch = super().__next__()
        self._batches += 1
        return batch

    def state(self) -> dict[str, Any]:
        state = super().state()
        return {**state, "position": gather_json(state["position"]), "batches": self._batches}

    def restore(self, state: dict[str, Any]) -> None:
        positions = state["position"]
        if len(positions) != self._count:
            if self._data.workers:
                raise ValueError(f"the data position was saved by {len(positions)} processes; resuming on "
                                 f"{self._count} needs data.workers=0")
            streams = split_state(positions, self._data.streams)
            position = host_state(streams, state["batches"] * self._batch_size, self._index, self._count)
        else:
            position = positions[self._index]
        super().restore({**state, "position": position})
        self._batches = state["batches"]


def gather_json(value: Any) -> list[Any]:
    """`value` from every process, in process order (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([raw.size]))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:raw.size] = raw
    rows = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[:int(n)])) for row, n in zip(rows, sizes.reshape(-1))]


class ValidationData:
    """A finite, unshuffled validation set; each iteration starts again from its first batch."""

    def __init__(self, dataset: grain.MapDataset, mesh: Mesh | None, fingerprint: str):
        self._dataset = dataset
        self._mesh = mesh
        self.fingerprint_of = fingerprint

    def __len__(self) -> int:
        return len(self._dataset)

    def __iter__(self) -> DataIterator:
        return DataIterator(self._dataset.to_iter_dataset(READ_OPTIONS), self._mesh, self.fingerprint_of,
                            ["validation"], 0)


def _stream(data: DataConfig, source: DataSource, tokenizer: Tokenizer, holdout: float, tail: bool) -> TokenStream:
    builder = open_source(source, data.data_dir, data.cache_dir, data.allow_download)
    key = source_id(source, builder) + (f"/{'last' if tail else 'first'}-{holdout}" if holdout else "")
    return token_stream(documents(source, builder, holdout, tail, data.data_dir), key, tokenizer,
                        cache_root(data.cache_dir))


def _holdout(data: DataConfig) -> float:
    """The fraction of the first source held out for validation (0 when `data.validation` names a source)."""
    if not 0 <= data.validation_fraction < 1:
        raise ConfigError(f"data.validation_fraction must be in [0, 1), got {data.validation_fraction}")
    if data.validation is not None and data.validation_fraction:
        raise ConfigError("set either data.validation or data.validation_fraction, not both")
    return data.validation_fraction


def _check(cfg: Config, tokenizer: Tokenizer) -> None:
    data = cfg.data
    if not data.sources:
        raise ConfigError("data.sources is empty; list at least one dataset")
    if any(s.weight <= 0 for s in data.sources):
        raise ConfigError(f"data source weights must be positive, got {[s.weight for s in data.sources]}")
    if not 0 < data.seq_len <= cfg.model.max_seq_len:
        raise ConfigError(f"data.seq_len {data.seq_len} must be in 1..model.max_seq_len ({cfg.model.max_seq_len})")
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                          f"{cfg.model.vocab_size}; set model.vocab_size >= {tokenizer.vocab_size}")


def fingerprint_of(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source_label(index: int, source: DataSource) -> str:
    """A short metrics name for a source: its index and its dataset name or directory."""
    name = source.name.split(",")[0].removeprefix(HF_PREFIX)
    if is_local(name) or Path(name).expanduser().exists():
        parts = [p for p in Path(name).parts if not any(c in p for c in "*?[")]
        name = Path(parts[-1]).stem if parts and parts[-1] != "/" else name
    return f"{index}_{re.sub(r'[^A-Za-z0-9._-]+', '_', name)[-40:]}"


def build_train_data(cfg: Config, tokenizer: Tokenizer, batch_size: int | None = None, mesh: Mesh | None = None, *,
                     process_index: int | None = None, process_count: int | None = None,
                     epochs: int | None = None) -> DataIterator:
    """Endless training batches `{"tokens": int32[B, seq_len + 1]}` (inputs = [:, :-1], targets = [:, 1:]).

    `batch_size` is global (default `cfg.train.batch_size`); this process gets its share. With a `mesh`, batches
    are global `jax.Array`s sharded over (data, fsdp); without one, this process's numpy arrays. With
    `data.streaming`, sources are read lazily (`streaming.py`); `epochs` then ends each stream after that many.
    """
    _check(cfg, tokenizer)
    data = cfg.data
    batch_size = batch_size or cfg.train.batch_size
    index, count = process_slot(process_index, process_count)
    local = _local_batch(batch_size, count)
    labels = [source_label(i, s) for i, s in enumerate(data.sources)]
    sources = [(s.name, s.split, s.text_feature, s.weight) for s in data.sources]
    if data.streaming:
        if data.validation_fraction:
            raise ConfigError("data.validation_fraction needs the whole first source; with data.streaming set "
                              "data.validation to a (small) source instead")
        dataset = host_dataset(data, tokenizer, index, count, epochs).batch(local)
        fingerprint = fingerprint_of("streaming", sources, data.streams, data.shuffle_buffer, data.seq_len,
                                   data.shuffle_seed, batch_size, tokenizer_hash(tokenizer))
        return StreamingDataIterator(dataset, mesh, fingerprint, labels, data.seq_len, data, batch_size, index, count)
    holdout = _holdout(data)
    parts = []
    for i, source in enumerate(data.sources):
        stream = _stream(data, source, tokenizer, holdout if i == 0 else 0.0, tail=False)
        room = data.seq_len - 1 if data.shift_windows else 0  # the largest shift
        n = window_count(len(stream) - room, data.seq_len)
        if n == 0:
            raise ValueError(f"data source {source.name} has {len(stream)} tokens, fewer than seq_len + 1"
                             + (" + seq_len - 1 (data.shift_windows)" if room else ""))
        order = grain.MapDataset.range(n).shuffle(seed=_seed(data.shuffle_seed, i)).repeat()
        shifts = (_seed(_seed(data.shuffle_seed, i), 0), n) if data.shift_windows else None
        parts.append(windows(stream, data.seq_len, order, source=i, shifts=shifts))
    mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, [s.weight for s in data.sources])
    dataset = mixed[index::count].batch(local).to_iter_dataset(READ_OPTIONS)
    fingerprint = fingerprint_of(sources, holdout, data.seq_len, data.shuffle_seed, batch_size,
                               tokenizer_hash(tokenizer), *(["shift_windows"] if data.shift_windows else []))
    return DataIterator(dataset, mesh, fingerprint, labels, data.seq_len)


def build_validation_data(cfg: Config, tokenizer: Tokenizer, batch_size: int | None = None, mesh: Mesh | None = None,
                          *, process_index: int | None = None,
                          process_count: int | None = None) -> ValidationData | None:
    """The validation set as full batches in order (the incomplete last batch is dropped), or None if none is set.

    Batches hold `tokens` as in training plus `target_bytes` (int32[B]): the UTF-8 bytes of text covered by each
    row's targets, so bits per byte = sum of target nats / ln 2 / sum of target_bytes.
    """
    _check(cfg, tokenizer)
    data = cfg.data
    holdout = _holdout(data)
    if data.validation is None and not holdout:
        return None
    source = data.validation or data.sources[0]
    batch_size = batch_size or cfg.train.batch_size
    index, count = process_slot(process_index, process_count)
    stream = _stream(data, source, tokenizer, holdout, tail=True)
    n = window_count(len(stream), data.seq_len) // batch_size * batch_size
    if n == 0:
        raise ValueError(f"validation data {source.name} has {len(stream)} tokens, less than one batch of "
                         f"{batch_size} x {data.seq_len + 1}; use a smaller batch or seq_len or more validation text")
    dataset = windows(stream, data.seq_len, grain.MapDataset.range(n), with_bytes=True)
    dataset = dataset[index::count].batch(_local_batch(batch_size, count))
    fingerprint = fingerprint_of(source.name, source.split, holdout, data.seq_len, batch_size,
                                 tokenizer_hash(tokenizer))
    return ValidationData(dataset, mesh, fingerprint)


def provision_tokenizer(cfg: Config, run_dir: PathLike) -> Tokenizer:
    """`data.tokenizer` if set; else `<run_dir>/tokenizer.model`, trained on the first source's training text the
    first time (so a resumed run reuses the same tokenizer); with `data.streaming`, on its first
    `TOKENIZER_SAMPLE_DOCS` documents.

    sentencepiece reads and writes local files only, so for a remote run dir (gs://...) the model is trained into,
    or fetched to, a local copy under `data.cache_dir`, and process 0 uploads a newly trained one (all hosts share
    the run dir).
    """
    data = cfg.data
    if data.tokenizer:
        return Tokenizer(data.tokenizer)
    path = as_path(run_dir) / "tokenizer.model"
    local = local_copy_path(path, cache_root(data.cache_dir))
    remote = is_remote(path)
    if path.exists():
        if remote:
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(path.read_bytes())
        return Tokenizer(local)
    source = data.sources[0]
    if data.streaming:
        text = itertools.islice(source_documents(source, data.data_dir), TOKENIZER_SAMPLE_DOCS)
    else:
        text = documents(source, open_source(source, data.data_dir, data.cache_dir, data.allow_download),
                         _holdout(data))
    tokenizer = Tokenizer.train(text, data.tokenizer_vocab_size, local.with_suffix(""), overwrite=remote)
    if remote and jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        for suffix in (".model", ".vocab"):
            path.with_suffix(suffix).write_bytes(local.with_suffix(suffix).read_bytes())
    return tokenizer
