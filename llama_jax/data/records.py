"""Record files and datasets read with a bad-record policy: every unusable record is reported with where it is.

Fine-tuning examples (`llama_jax.data.sft`) and preference pairs (`llama_jax.alignment.preferences`) share this:
the files of a comma-separated spec (local or gs://, globs allowed), one JSON object per line, each encoded by the
caller's function; the `policy` decides whether an unusable record is skipped, truncated (over-long ones) or fatal.

A spec may instead name a dataset, read with the pretraining readers (`sources.prepared_builder`, `shards`): a TFDS
dataset `tfds:NAME[:VERSION]` in `data.data_dir`, or a Hugging Face dataset `hf:ORG/NAME[:config]` / `hf:/path` (a
`save_to_disk` directory or a directory of data files such as parquet), one split of it. Its bad records are reported
as `source [split] record INDEX`. `fields` renames columns to the names the encoder expects (`{"prompt": "question"}`).
"""

from __future__ import annotations

import glob
import json
import logging
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from llama_jax.config import ConfigError, DataConfig, DataSource
from llama_jax.data.shards import hf_locator, hf_stream, is_saved_dataset, random_access, is_hf
from llama_jax.paths import as_path, is_remote

log = logging.getLogger(__name__)
POLICIES = ("truncate", "skip", "fail")
T = TypeVar("T")
TFDS_PREFIX = "tfds:"


def is_dataset(spec: str) -> bool:
    return is_hf(spec) or spec.startswith(TFDS_PREFIX)


@dataclass
class BadRecord:
    file: str  # a JSONL file, or `source [split]` for a dataset
    line: int  # the line, or the record index in a dataset
    reason: str

    def where(self) -> str:
        return f"{self.file} record {self.line}" if is_dataset(self.file) else f"{self.file}:{self.line}"

    def __str__(self) -> str:
        return f"{self.where()}: {self.reason}"


@dataclass
class RecordIssues:
    """The records that were not usable as they stood: skipped ones and truncated ones."""

    bad: list[BadRecord] = field(default_factory=list)
    truncated: list[BadRecord] = field(default_factory=list)

    def report(self) -> str:
        """One line per file with counts, then one line per bad or truncated record (`file:line: reason`)."""
        files = sorted({r.file for r in self.bad + self.truncated})
        lines = [f"{f}: {sum(r.file == f for r in self.bad)} bad record(s) skipped, "
                 f"{sum(r.file == f for r in self.truncated)} truncated" for f in files]
        lines += [f"skipped {r}" for r in self.bad] + [f"truncated {r}" for r in self.truncated]
        return "\n".join(lines)


def data_files(spec: str, setting: str = "finetune.train") -> list[str]:
    """Comma-separated JSONL paths or globs (local or gs://) in order; every entry must match a file."""
    files: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if is_remote(part):
            path = as_path(part)
            matches = [str(path)] if path.exists() else sorted(str(p) for p in path.parent.glob(path.name))
        else:
            matches = sorted(glob.glob(str(as_path(part).expanduser())))
        if not matches:
            raise FileNotFoundError(f"no file matches '{part}' ({setting}); check the path or glob")
        if folder := next((m for m in matches if as_path(m).is_dir()), None):
            raise IsADirectoryError(f"{setting} '{folder}' is a directory; give its JSONL files, e.g. "
                                    f"{folder.rstrip('/')}/*.jsonl")
        files += matches
    if not files:
        raise ConfigError(f"{setting} is empty; give JSONL files, e.g. {setting}=data/train.jsonl, tfds:NAME or "
                          "hf:NAME")
    return files


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


def _dataset_rows(spec: str, split: str, data: DataConfig) -> Iterator[Any]:
    if is_hf(spec):
        name, config, split = hf_locator(DataSource(spec, split))
        yield from random_access("hf_disk", (name, split)) if is_saved_dataset(name) else \
            hf_stream((name, config, split))
        return
    import tensorflow_datasets as tfds

    from llama_jax.data.sources import prepared_builder

    builder = prepared_builder(spec.removeprefix(TFDS_PREFIX), data.data_dir, data.allow_download)
    if split.split("[")[0] not in builder.info.splits:
        raise ValueError(f"dataset '{spec}' has no split '{split}' (it has {sorted(builder.info.splits)}); "
                         "set finetune.train_split / finetune.validation_split")
    yield from tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))


def _raw_records(spec: str, setting: str, split: str, data: DataConfig) -> Iterator[tuple[str, int, Any]]:
    """(file, line, JSONL line as bytes) for files; (`spec [split]`, index, row) for a dataset."""
    if is_dataset(spec):
        for index, row in enumerate(_dataset_rows(spec, split, data)):
            yield f"{spec} [{split}]", index, row
        return
    for file in data_files(spec, setting):
        with as_path(file).open("rb") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    yield file, line_no, line


def _parse(raw: Any, fields: Mapping[str, str]) -> Any:
    """A raw record as plain Python with columns renamed by `fields`, or a ValueError saying why it is unreadable."""
    if isinstance(raw, bytes):
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(f"not UTF-8 text ({err.reason} at byte {err.start})") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"not valid JSON ({err.msg} at column {err.colno})") from None
    else:
        record = _plain(raw, top=True)
    if isinstance(record, dict) and fields:
        record = {name: record[name] for name in record if name not in fields.values()} | {
            ours: record[theirs] for ours, theirs in fields.items() if theirs in record}
    return record


def read_records(spec: str, encode: Callable[[Any, bool], tuple[T, str | None]], policy: str, setting: str,
                 split: str = "train", data: DataConfig | None = None,
                 fields: Mapping[str, str] | None = None) -> tuple[list[T], RecordIssues]:
    """Encoded items of every record of `spec` (JSONL files, or `split` of a dataset; the config key `setting` names
    it in messages), with columns renamed by `fields`.

    `encode(record, truncate)` returns the item and, if it had to cut the record to fit, why (only when `truncate`
    is True), or raises ValueError saying what is wrong. Under `policy` "fail" the first bad record stops with its
    file and line; otherwise every bad or truncated record is reported on stderr and skipped or kept.
    """
    if policy not in POLICIES:
        raise ConfigError(f"bad_records policy '{policy}' is not one of {POLICIES}")
    items: list[T] = []
    issues = RecordIssues()
    for file, line_no, raw in _raw_records(spec, setting, split, data or DataConfig()):
        try:
            item, cut = encode(_parse(raw, fields or {}), policy == "truncate")
        except ValueError as err:
            if policy == "fail":
                raise ValueError(f"{BadRecord(file, line_no, str(err))} (bad_records=fail; fix the record or choose "
                                 "skip/truncate)") from None
            issues.bad.append(BadRecord(file, line_no, str(err)))
            continue
        if cut is not None:
            issues.truncated.append(BadRecord(file, line_no, cut))
        items.append(item)
    if issues.bad or issues.truncated:
        report = issues.report()
        log.warning("%s", report)
        print(f"WARNING: {report}", file=sys.stderr, flush=True)
    if not items:
        raise ValueError(f"no usable records in '{spec}' ({setting}); see the bad-record report above")
    return items, issues
