"""Where fine-tuning records come from: JSONL files (local or gs://), a TFDS dataset (`tfds:NAME[:VERSION]`, the
name spelled as for pretraining sources) or a Hugging Face dataset (`hf:ORG/NAME[:config]` or `hf:/path` to a
`save_to_disk` directory or a directory of data files such as parquet) — read with the same readers as
pretraining text (`sources.prepared_builder`, `shards`).

Each record comes with where it is (`file` and line for JSONL, `source [split]` and record index for datasets) so a
bad one can be reported, and is read lazily (`Record.read`), so an undecodable one is a reportable error, not a
crash. `fields` renames source columns to the names the SFT encoder expects (`{"prompt": "question"}`).
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from llama_jax.config import ConfigError, DataConfig, DataSource
from llama_jax.data.shards import _hf_locator, _hf_stream, _is_saved_dataset, _random_access, is_hf
from llama_jax.paths import as_path, is_remote

TFDS_PREFIX = "tfds:"


def is_dataset(spec: str) -> bool:
    return is_hf(spec) or spec.startswith(TFDS_PREFIX)


@dataclass
class Record:
    """One raw record and its place: `file` is a JSONL path or `source [split]`, `index` a line or record index."""

    file: str
    index: int
    raw: Any  # a JSONL line (bytes) or a dataset row
    fields: Mapping[str, str]

    def read(self) -> Any:
        """The record as plain Python with columns renamed by `fields`, or a ValueError saying why it is unreadable."""
        if isinstance(self.raw, bytes):
            try:
                record = json.loads(self.raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise ValueError(f"not UTF-8 text ({err.reason} at byte {err.start})") from None
            except json.JSONDecodeError as err:
                raise ValueError(f"not valid JSON ({err.msg} at column {err.colno})") from None
        else:
            record = _plain(self.raw, top=True)
        if isinstance(record, dict):
            record = {name: record[name] for name in record if name not in self.fields.values()} | {
                ours: record[theirs] for ours, theirs in self.fields.items() if theirs in record}
        return record

    def where(self) -> str:
        return f"{self.file} record {self.index}" if is_dataset(self.file) else f"{self.file}:{self.index}"


def _plain(value: Any, top: bool = False) -> Any:
    """TFDS numpy values as JSON-like Python: bytes -> str (UTF-8), arrays -> lists, and a TFDS `Sequence` of dicts
    (a dict of equal-length lists, e.g. `messages: {role: [...], content: [...]}`) -> a list of dicts."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return _plain(value.item()) if value.ndim == 0 else [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        value = {k: _plain(v) for k, v in value.items()}
        columns = list(value.values())
        if not top and columns and all(isinstance(c, list) for c in columns) and len({len(c) for c in columns}) == 1:
            return [dict(zip(value, row)) for row in zip(*columns)]
    return value


def data_files(spec: str) -> list[str]:
    """Comma-separated JSONL paths or globs (local or gs://) in order; every entry must match a file."""
    files: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if is_remote(part):
            path = as_path(part)
            matches = [str(path)] if path.exists() else sorted(str(p) for p in path.parent.glob(path.name))
        else:
            matches = sorted(glob.glob(str(as_path(part).expanduser())))
        if not matches:
            raise FileNotFoundError(f"no file matches '{part}' (finetune data); check the path or glob")
        if folder := next((m for m in matches if as_path(m).is_dir()), None):
            raise IsADirectoryError(f"finetune data '{folder}' is a directory; give its JSONL files, e.g. "
                                    f"{folder.rstrip('/')}/*.jsonl")
        files += matches
    if not files:
        raise ConfigError("finetune.train is empty; give JSONL files (finetune.train=data/sft.jsonl), "
                          "tfds:NAME or hf:NAME")
    return files


def _dataset_rows(spec: str, split: str, data: DataConfig) -> Iterator[Any]:
    if is_hf(spec):
        name, config, split = _hf_locator(DataSource(spec, split))
        yield from _random_access("hf_disk", (name, split)) if _is_saved_dataset(name) else \
            _hf_stream((name, config, split))
        return
    import tensorflow_datasets as tfds

    from llama_jax.data.sources import prepared_builder

    name = spec.removeprefix(TFDS_PREFIX)
    builder = prepared_builder(name, data.data_dir, data.allow_download)
    if split.split("[")[0] not in builder.info.splits:
        raise ValueError(f"dataset '{spec}' has no split '{split}' (it has {sorted(builder.info.splits)}); "
                         "set finetune.train_split / finetune.validation_split")
    yield from tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))


def records(spec: str, split: str, data: DataConfig, fields: Mapping[str, str]) -> Iterator[Record]:
    """Every record of `spec` in order: the non-blank lines of its JSONL files, or the rows of a dataset's split."""
    if is_dataset(spec):
        label = f"{spec} [{split}]"
        for index, row in enumerate(_dataset_rows(spec, split, data)):
            yield Record(label, index, row, fields)
        return
    for file in data_files(spec):
        with as_path(file).open("rb") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    yield Record(file, line_no, line, fields)
