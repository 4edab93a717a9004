"""JSONL record files read with a bad-record policy: every unusable record is reported with its file and line.

Fine-tuning examples (`llama_jax.data.sft`) and preference pairs (`llama_jax.alignment.preferences`) share this:
the files of a comma-separated spec (local or gs://, globs allowed), one JSON object per line, each encoded by the
caller's function; the `policy` decides whether an unusable record is skipped, truncated (over-long ones) or fatal.
"""

from __future__ import annotations

import glob
import json
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from llama_jax.config import ConfigError
from llama_jax.paths import as_path, is_remote

log = logging.getLogger(__name__)
POLICIES = ("truncate", "skip", "fail")
T = TypeVar("T")


@dataclass
class BadRecord:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


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
        files += matches
    if not files:
        raise ConfigError(f"{setting} is empty; give JSONL files, e.g. {setting}=data/train.jsonl")
    return files


def _lines(file: str) -> Iterator[tuple[int, str]]:
    with as_path(file).open("r") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                yield line_no, line


def read_records(spec: str, encode: Callable[[Any, bool], tuple[T, str | None]], policy: str,
                 setting: str) -> tuple[list[T], RecordIssues]:
    """Encoded items of every record in the JSONL files of `spec` (the config key `setting` names it in messages).

    `encode(record, truncate)` returns the item and, if it had to cut the record to fit, why (only when `truncate`
    is True), or raises ValueError saying what is wrong. Under `policy` "fail" the first bad record stops with its
    file and line; otherwise every bad or truncated record is reported on stderr and skipped or kept.
    """
    if policy not in POLICIES:
        raise ConfigError(f"bad_records policy '{policy}' is not one of {POLICIES}")
    items: list[T] = []
    issues = RecordIssues()
    for file in data_files(spec, setting):
        for line_no, line in _lines(file):
            try:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"not valid JSON ({err.msg} at column {err.colno})") from None
                item, cut = encode(record, policy == "truncate")
            except ValueError as err:
                if policy == "fail":
                    raise ValueError(f"{file}:{line_no}: {err} (bad_records=fail; fix the record or choose "
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
