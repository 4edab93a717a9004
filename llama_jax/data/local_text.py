"""A TFDS builder for the user's own text files, so they travel the same path as any TFDS dataset.

Each `.txt` file is one document; each line of a `.jsonl` file is one document (its `text_field` value). The builder
config is named by a hash of the file paths, sizes and modification times, so changed files are prepared afresh
into the cache `data_dir` and unchanged ones are reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import tensorflow_datasets as tfds

SUFFIXES = (".txt", ".jsonl")


@dataclasses.dataclass
class LocalTextConfig(tfds.core.BuilderConfig):
    files: tuple[str, ...] = ()
    text_field: str = "text"


class LocalText(tfds.core.GeneratorBasedBuilder):
    """Documents from local `.txt` / `.jsonl` files, in the order given, as a single `train` split."""

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


def _documents(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8")
        return
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{line_no} is not valid JSON (a .jsonl file holds one object per line)") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ValueError(f"{path}:{line_no} has no string field '{text_field}'; set the source's text_feature")
            yield record[text_field]


def local_builder(files: Sequence[Path], text_field: str, data_dir: Path) -> LocalText:
    """The prepared builder for `files` under `data_dir` (prepared on first use)."""
    stamp = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    digest = hashlib.sha256(json.dumps([stamp, text_field]).encode()).hexdigest()[:16]
    config = LocalTextConfig(name=f"files_{digest}", files=tuple(s[0] for s in stamp), text_field=text_field)
    builder = LocalText(config=config, data_dir=str(data_dir))
    builder.download_and_prepare()
    return builder
