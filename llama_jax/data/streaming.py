"""Streaming training data: shards -> documents tokenized on the fly -> packed windows -> shuffled -> mixed -> hosts.

Every source is split into `data.streams` streams. In epoch e, stream v of a source reads the shards at positions
v, v + streams, ... of that epoch's shard permutation, tokenizes and packs them (the same EOS-joined `seq_len + 1`
windows as the in-memory path) and shuffles the windows through a buffer (`_ShuffleIterator`), then
goes on to its next epoch; the streams of one epoch together read every shard exactly once. Mixed stream v draws
from each source's stream v in exact weight proportions (grain `IterDataset.mix`), and the global window order is
the round-robin over mixed streams: window j comes from stream j % streams. Process p owns the streams v with
v % process_count == p and reads only their shards; its round-robin (grain `InterleaveIterDataset`, one background
thread per stream, optionally grain worker processes) yields exactly the global windows j % process_count == p, so
the batches are the same for any process count that divides `streams`.

The position is grain's iterator state: per stream, the shard and int position where its current pack and shuffle
buffer started, so restoring re-reads at most one shuffle buffer. `host_state`/`split_state` regroup the per-stream
states when a run resumes on a different number of processes.
"""

from __future__ import annotations

import collections
import functools
from typing import Any

import grain
import numpy as np

from llama_jax.config import ConfigError, DataConfig
from llama_jax.data.shards import Shard, source_shards
from llama_jax.data.tokenized import document_ids, window
from llama_jax.tokenizer import Tokenizer

EPOCHS = 1 << 40  # endless: a stream moves on to its next epoch when one ends


def seed_for(*parts: int) -> int:
    """A 31-bit seed derived from integers (grain and numpy take ints; distinct parts give unrelated seeds)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0] >> 1)


class _PiecesIterator(grain.DatasetIterator):
    """Text pieces of a list of shards in order; the state is (shard, position inside it)."""

    def __init__(self, shards: list[Shard]):
        super().__init__()
        self._shards = shards
        self._shard = self._position = 0
        self._reader = None

    def __next__(self) -> tuple[str, bool]:
        while self._shard < len(self._shards):
            if self._reader is None:
                self._reader = self._shards[self._shard].pieces(self._position)
            try:
                text, ends, self._position = next(self._reader)
                return text, ends
            except StopIteration:
                self._shard, self._position, self._reader = self._shard + 1, 0, None
        raise StopIteration

    def get_state(self) -> dict[str, int]:
        return {"shard": self._shard, "position": self._position}

    def set_state(self, state: dict[str, int]) -> None:
        self._shard, self._position, self._reader = state["shard"], state["position"], None


class Pieces(grain.IterDataset):
    def __init__(self, shards: list[Shard]):
        super().__init__()
        self._shards = shards

    def __iter__(self) -> _PiecesIterator:
        return _PiecesIterator(self._shards)


class _PackIterator(grain.DatasetIterator):
    """Concatenate token arrays and cut windows with `tokenized.window`; the tail of the stream is dropped.

    The state is the parent's state before the document holding the next window's first token, plus that token's
    offset in the document, so a restore re-tokenizes one document instead of keeping the buffer.
    """

    def __init__(self, parent: grain.DatasetIterator, seq_len: int, source: int):
        super().__init__(parent)
        self._seq_len = seq_len
        self._source = np.int32(source)
        self._buffer = np.zeros(0, np.int32)
        self._docs: collections.deque[tuple[Any, int]] = collections.deque()  # (parent state before, tokens)
        self._offset = 0  # tokens of the first document in _docs already behind the buffer start
        self._skip = 0  # after a restore: tokens to drop from the first document read

    def __next__(self) -> dict[str, np.ndarray]:
        while len(self._buffer) <= self._seq_len:
            before = self._parent.get_state()
            ids = next(self._parent)
            take = 0
            if not self._docs:
                take = self._offset = self._skip
                self._skip = 0
            self._docs.append((before, len(ids)))
            self._buffer = np.concatenate([self._buffer, ids[take:]])
        out = window(self._buffer, 0, self._seq_len)
        self._buffer = self._buffer[self._seq_len:]
        self._offset += self._seq_len
        while self._offset >= self._docs[0][1]:
            self._offset -= self._docs.popleft()[1]
        return {"tokens": out, "source": self._source}

    def get_state(self) -> dict[str, Any]:
        if self._docs:
            return {"parent": self._docs[0][0], "offset": self._offset}
        return {"parent": self._parent.get_state(), "offset": self._skip}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._buffer, self._docs, self._offset, self._skip = np.zeros(0, np.int32), collections.deque(), 0, \
            state["offset"]


class Stage(grain.IterDataset):
    """A transformation given by its iterator class: `make(parent_iterator)` (a picklable partial)."""

    def __init__(self, parent: grain.IterDataset, make: Any):
        super().__init__(parent)
        self._make = make

    def __iter__(self) -> grain.DatasetIterator:
        return self._make(self._parent.__iter__())


class _ShuffleIterator(grain.DatasetIterator):
    """Emit the parent's elements `size` at a time in a random order (a fresh permutation per buffer).

    The same contract as grain's `WindowShuffleIterDataset` (the state is the parent's state where the buffer
    started plus the position in it), with a numpy permutation: grain's per-element `index_shuffle` took 10 ms per
    window here, 100x the cost of tokenizing it.
    """

    def __init__(self, parent: grain.DatasetIterator, size: int, seed: int):
        super().__init__(parent)
        self._size = size
        self._seed = seed
        self._buffer: list[Any] = []
        self._start = self._parent.get_state()
        self._index = self._pos = 0

    def _fill(self) -> None:
        self._buffer = []
        for element in self._parent:
            self._buffer.append(element)
            if len(self._buffer) == self._size:
                break
        order = np.random.default_rng(seed_for(self._seed, self._index)).permutation(len(self._buffer))
        self._buffer = [self._buffer[k] for k in order]

    def __next__(self) -> Any:
        if self._pos == len(self._buffer):
            if self._buffer:
                self._index += 1
            self._start, self._pos = self._parent.get_state(), 0
            self._fill()
            if not self._buffer:
                raise StopIteration
        self._pos += 1
        return self._buffer[self._pos - 1]

    def get_state(self) -> dict[str, Any]:
        return {"start": self._start, "index": self._index, "pos": self._pos}

    def set_state(self, state: dict[str, Any]) -> None:
        self._start, self._index = state["start"], state["index"]
        self._parent.set_state(self._start)
        self._fill()
        self._pos = state["pos"]


def _tokenize(tokenizer: Tokenizer, piece: tuple[str, bool]) -> np.ndarray:
    """The piece's token ids, with EOS when it ends a document."""
    return document_ids(tokenizer, *piece)


@functools.cache
def _permutation(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)


def _epoch(index: int, shards: tuple[Shard, ...], stream: int, data: DataConfig, source: int,
           tokenizer: Tokenizer) -> grain.IterDataset:
    """One epoch of one stream of one source: its shards in this epoch's order, packed and buffer-shuffled."""
    order = _permutation(len(shards), seed_for(data.shuffle_seed, source, index))
    mine = [shards[k] for k in order[stream::data.streams]]
    tokens = Pieces(mine).map(functools.partial(_tokenize, tokenizer))
    packed = Stage(tokens, functools.partial(_PackIterator, seq_len=data.seq_len, source=source))
    seed = seed_for(data.shuffle_seed, source, stream, index)
    return Stage(packed, functools.partial(_ShuffleIterator, size=data.shuffle_buffer, seed=seed))


def _stream(shards: tuple[Shard, ...], stream: int, data: DataConfig, source: int, tokenizer: Tokenizer,
            epochs: int) -> grain.IterDataset:
    make = functools.partial(_epoch, shards=shards, stream=stream, data=data, source=source, tokenizer=tokenizer)
    return grain.experimental.InterleaveIterDataset(grain.MapDataset.range(epochs).map(make), cycle_length=1)


def check_streams(data: DataConfig, process_count: int) -> None:
    parallel = process_count * max(data.workers, 1)
    if data.streams <= 0 or data.streams % parallel:
        raise ConfigError(f"data.streams ({data.streams}) must be a positive multiple of the process count "
                          f"({process_count}) times data.workers ({max(data.workers, 1)})")
    if data.shuffle_buffer <= 0 or data.workers < 0:
        raise ConfigError("data.shuffle_buffer must be positive and data.workers non-negative")


def host_dataset(data: DataConfig, tokenizer: Tokenizer, process_index: int, process_count: int,
                 epochs: int | None = None) -> grain.IterDataset:
    """This process's windows, in global order j = process_index, process_index + process_count, ...

    `epochs` (default endless) ends every stream after that many epochs of its shards, e.g. to inspect one epoch.
    """
    check_streams(data, process_count)
    shards = [tuple(source_shards(source, data.data_dir, data.streams)) for source in data.sources]
    weights = [source.weight for source in data.sources]
    mixed = []
    for v in range(process_index, data.streams, process_count):
        parts = [_stream(s, v, data, i, tokenizer, epochs or EPOCHS) for i, s in enumerate(shards)]
        mixed.append(parts[0] if len(parts) == 1 else grain.IterDataset.mix(parts, weights))
    ds = grain.experimental.InterleaveIterDataset(mixed, cycle_length=len(mixed), iter_buffer_size=4)
    if data.workers:
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()  # grain's worker start reads absl flags, which only absl's app.run parses
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.workers))
    return ds


def split_state(states: list[dict[str, Any]], streams: int) -> list[Any]:
    """Per-stream states (index = stream) from the round-robin states of all processes, in process order."""
    count = len(states)
    out: list[Any] = [None] * streams
    for p, state in enumerate(states):
        for slot, index in enumerate(state["iterators_in_use_indices"]):
            out[p + index * count] = state["iterators_in_use_states"][slot]
    return out


def host_state(streams: list[Any], windows_seen: int, process_index: int, process_count: int) -> dict[str, Any]:
    """The round-robin state of process `process_index` of `process_count` after `windows_seen` global windows."""
    mine = streams[process_index::process_count]
    return {"next_index_in_cycle": windows_seen // process_count % len(mine), "next_index_in_datasets": len(mine),
            "iterators_in_use_indices": list(range(len(mine))), "iterators_in_use_states": mine,
            "exhausted": [0] * len(mine), "future_states": {}}

