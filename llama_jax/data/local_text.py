"""A TFDS builder for the user's own text files, so they travel the same path as any TFDS dataset.

Each `.txt` file is one document; each line of a `.jsonl` file or row of a `.parquet` file is one document (its
`text_field` value). The same readers serve the streaming pipeline, which reads the files directly. The builder
config is named by a hash of the file paths, sizes and modification times, so changed files are prepared afresh
into the cache `data_dir` and unchanged ones are reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import tensorflow_datasets as tfds

SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclasses.dataclass
class LocalTextConfig(tfds.core.BuilderConfig):
    files: tuple[str, ...] = ()
    text_field: str = "text"


class LocalText(tfds.core.GeneratorBasedBuilder):
    """Documents from local `.txt` / `.jsonl` / `.parquet` files, in the order given, as a single `train` split."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIG_CLASS = LocalTextConfig

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        return {"train": self._generate_examples()}

    def _generate_examples(self) -> Iterator[tuple[str, dict[str, str]]]:
        cfg: LocalTextConfig = self.builder_config
        for file_index, name in enumerate(cfg.files):
            for doc_index, text in enumerate(_documents(Path(name), cfg.text_field)):
                yield f"{file_index:06d}-{doc_index:09d}", {"text": text}


Piece = tuple[str, bool, int]  # (text, whether it ends a document, position just after it)
TEXT_CHUNK_BYTES = 1 << 20


def file_pieces(path: Path, text_field: str, position: int = 0) -> Iterator[Piece]:
    """The text of a local file from `position` on, in pieces that each resume at the position they report.

    A `.txt` file is one document, read in ~1 MiB chunks at line ends (so a huge file never sits in memory whole);
    a `.jsonl` line or a `.parquet` row is one document. Positions are byte offsets (rows for parquet).
    """
    if path.suffix == ".parquet":
        yield from _parquet_rows(path, text_field, position)
        return
    size = path.stat().st_size
    with path.open("rb") as f:
        f.seek(position)
        if path.suffix == ".txt":
            if size == 0:
                yield "", True, 0
            while position < size:
                chunk = f.read(TEXT_CHUNK_BYTES) + f.readline()
                position += len(chunk)
                yield chunk.decode("utf-8"), position >= size, position
            return
        for line in f:
            start, position = position, position + len(line)
            if line.strip():
                yield _json_text(line, path, start, text_field), True, position


def _json_text(line: bytes, path: Path, offset: int, text_field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise ValueError(f"{path} (byte {offset}) is not valid JSON (a .jsonl file holds one object per line)") from None
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise ValueError(f"{path} (byte {offset}) has no string field '{text_field}'; set the source's text_feature")
    return record[text_field]


def _parquet_rows(path: Path, text_field: str, position: int) -> Iterator[Piece]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    if text_field not in parquet.schema_arrow.names:
        raise ValueError(f"{path} has no column '{text_field}' (it has {parquet.schema_arrow.names}); "
                         "set the source's text_feature")
    first = 0
    for group in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        if first + rows > position:
            texts = parquet.read_row_group(group, columns=[text_field]).column(0).to_pylist()
            for row in range(max(position - first, 0), rows):
                yield texts[row] or "", True, first + row + 1
        first += rows


def whole_documents(pieces: Iterable[Piece]) -> Iterator[str]:
    """Join pieces back into documents."""
    parts = []
    for text, ends, _ in pieces:
        parts.append(text)
        if ends:
            yield "".join(parts)
            parts = []


def _documents(path: Path, text_field: str) -> Iterator[str]:
    return whole_documents(file_pieces(path, text_field))


def local_builder(files: Sequence[Path], text_field: str, data_dir: Path) -> LocalText:
    """The prepared builder for `files` under `data_dir` (prepared on first use)."""
    stamp = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    digest = hashlib.sha256(json.dumps([stamp, text_field]).encode()).hexdigest()[:16]
    config = LocalTextConfig(name=f"files_{digest}", files=tuple(s[0] for s in stamp), text_field=text_field)
    builder = LocalText(config=config, data_dir=str(data_dir))
    builder.download_and_prepare()
    return builder
