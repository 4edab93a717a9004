"""Streaming sources as lists of shards, each read lazily from a saved position without touching the others.

A shard is a local file, a record range of a random-access dataset (TFDS `data_source` over array_record files, a
Hugging Face dataset written by `save_to_disk`), a record range of a TFDS dataset in another file format (read in
order through a split slice), or one shard of a Hugging Face streaming dataset (`load_dataset(...,
streaming=True)`: hub datasets and directories of data files). `pieces(position)` yields `(text, ends_document,
next_position)`, so a stream resumes exactly by reopening one shard at an int position. Shards are small frozen
dataclasses: grain worker processes receive them pickled and open their own readers.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llama_jax.config import ConfigError, DataSource
from llama_jax.data.local_text import Piece, file_pieces, whole_documents

HF_PREFIX = "hf:"
READ_BATCH = 64


@dataclasses.dataclass(frozen=True)
class FileShard:
    path: str
    text_field: str

    def pieces(self, position: int) -> Iterator[Piece]:
        return file_pieces(Path(self.path), self.text_field, position)


@dataclasses.dataclass(frozen=True)
class RangeShard:
    """Records [start, stop) of a random-access dataset; positions are record indices."""

    kind: str  # "tfds" (array_record), "tfds_records" (other TFDS file formats: read in order) or "hf_disk"
    locator: tuple[str | None, ...]
    text_field: str
    start: int
    stop: int

    def pieces(self, position: int) -> Iterator[Piece]:
        if self.kind == "tfds_records":
            yield from self._tfds_records(max(position, self.start))
            return
        source = random_access(self.kind, self.locator)
        for first in range(max(position, self.start), self.stop, READ_BATCH):
            last = min(first + READ_BATCH, self.stop)
            if self.kind == "tfds":
                texts = [record[self.text_field].decode("utf-8") for record in source.__getitems__(range(first, last))]
            else:
                texts = source[first:last][self.text_field]
            for offset, text in enumerate(texts):
                yield text or "", True, first + offset + 1

    def _tfds_records(self, first: int) -> Iterator[Piece]:
        """Records [first, stop) through tf.data: TFDS split slicing opens only the files that hold them."""
        name, split, data_dir = self.locator
        ds = _tfds_builder(name, data_dir).as_dataset(split=f"{split}[{first}:{self.stop}]", shuffle_files=False)
        for n, text in enumerate(ds.map(lambda ex: ex[self.text_field]).as_numpy_iterator(), first + 1):
            yield text.decode("utf-8"), True, n


@dataclasses.dataclass(frozen=True)
class HFStreamShard:
    """Shard `index` of `count` of a Hugging Face streaming dataset; positions count examples."""

    locator: tuple[str | None, ...]
    text_field: str
    index: int
    count: int

    def pieces(self, position: int) -> Iterator[Piece]:
        stream = hf_stream(self.locator).shard(num_shards=self.count, index=self.index)
        for n, example in enumerate(stream.skip(position) if position else stream, position + 1):
            if not isinstance(example.get(self.text_field), str):
                raise ValueError(f"hf:{self.locator[0]} has no string field '{self.text_field}' (it has "
                                 f"{sorted(example)}); set the source's text_feature")
            yield example[self.text_field], True, n


Shard = FileShard | RangeShard | HFStreamShard


def is_hf(name: str) -> bool:
    return name.startswith(HF_PREFIX)


def hf_locator(source: DataSource) -> tuple[str, str | None, str]:
    """(path or ORG/NAME, config, split) of an `hf:` source name."""
    spec = source.name[len(HF_PREFIX):]
    if Path(spec).expanduser().exists():
        return str(Path(spec).expanduser().resolve()), None, source.split
    if spec.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"'{source.name}': no directory {spec}; give a save_to_disk directory, a directory of "
                                "data files, or a hub name hf:ORG/NAME")
    name, _, config = spec.partition(":")
    return name, config or None, source.split


def is_saved_dataset(path: str) -> bool:
    return any((Path(path) / f).is_file() for f in ("state.json", "dataset_dict.json"))


@functools.cache
def _tfds_builder(name: str, data_dir: str | None) -> Any:
    import tensorflow_datasets as tfds

    return tfds.builder(name, data_dir=data_dir)


@functools.cache
def random_access(kind: str, locator: tuple[str | None, ...]) -> Any:
    if kind == "tfds":
        import tensorflow_datasets as tfds

        name, split, data_dir = locator
        return tfds.data_source(name, split=split, data_dir=data_dir)
    import datasets

    path, split = locator
    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"hf:{path} has no split '{split}' (it has {sorted(loaded)}); set the source's split")
        loaded = loaded[split]
    return loaded


@functools.cache
def hf_stream(locator: tuple[str | None, ...]) -> Any:
    import datasets

    name, config, split = locator
    return datasets.load_dataset(name, config, split=split, streaming=True)


def _ranges(kind: str, locator: tuple[str | None, ...], field: str, length: int, count: int) -> list[RangeShard]:
    bounds = [length * k // count for k in range(count + 1)]
    return [RangeShard(kind, locator, field, a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _tfds_shards(source: DataSource, data_dir: str | None, streams: int) -> list[Shard]:
    """Record ranges, read by `tfds.data_source` from array_record files, or in order through tf.data otherwise."""
    builder = _tfds_builder(source.name, data_dir)
    if not builder.is_prepared():
        raise FileNotFoundError(f"TFDS dataset '{source.name}' is not prepared in {builder.data_dir}; prepare it "
                                "(tfds build --file_format=array_record) or set data.data_dir")
    info = builder.info
    if source.text_feature not in info.features:
        raise ValueError(f"dataset '{source.name}' has no feature '{source.text_feature}' (it has "
                         f"{list(info.features)}); set the source's text_feature")
    locator = (source.name, source.split, data_dir)
    file_format = getattr(info.file_format, "value", "tfrecord")
    if file_format == "array_record":
        length, kind = len(random_access("tfds", locator)), "tfds"
    elif "[" in source.split:
        raise ValueError(f"TFDS dataset '{source.name}' is stored as {file_format}: stream a whole split "
                         "(not a slice), or prepare it with file_format=array_record")
    else:
        length, kind = info.splits[source.split].num_examples, "tfds_records"
    files = info.splits[source.split.split("[")[0]].num_shards
    return _ranges(kind, locator, source.text_feature, length, max(files, streams))


def source_shards(source: DataSource, data_dir: str | None, streams: int) -> list[Shard]:
    """The shards of one source, in a fixed order, at least `streams` of them (or a one-line error)."""
    from llama_jax.data.sources import is_local, local_files

    field = source.text_feature
    if is_hf(source.name):
        name, config, split = hf_locator(source)
        if is_saved_dataset(name):
            dataset = random_access("hf_disk", (name, split))
            if field not in dataset.column_names:
                raise ValueError(f"{source.name} has no column '{field}' (it has {dataset.column_names}); "
                                 "set the source's text_feature")
            count = max(len(dataset.cache_files), streams)
            shards: list[Shard] = _ranges("hf_disk", (name, split), field, len(dataset), count)
        else:
            stream = hf_stream((name, config, split))
            shards = [HFStreamShard((name, config, split), field, i, stream.n_shards) for i in range(stream.n_shards)]
    elif is_local(source.name):
        shards = [FileShard(str(path), field) for path in local_files(source.name)]
    else:
        shards = _tfds_shards(source, data_dir, streams)
    if len(shards) < streams:
        raise ConfigError(f"data source {source.name} has {len(shards)} shards (files), fewer than data.streams="
                          f"{streams}; split it into more files or lower data.streams")
    return shards


def source_documents(source: DataSource, data_dir: str | None) -> Iterator[str]:
    """Every document of a source, shard after shard (for the in-memory path and tokenizer training)."""
    for shard in source_shards(source, data_dir, 1):
        yield from whole_documents(shard.pieces(0))
