"""Where text comes from: any TFDS text dataset by name, or local `.txt`/`.jsonl` files via the LocalText builder.

TFDS names that work as-is (feature `text` unless noted): `tiny_shakespeare`, `lm1b`, `c4/en` (huge: use a split
slice such as `train[:1%]`), `wikipedia/20230601.en` (features `title`, `text`). A `data_dir` of `gs://...` is read
by tfds directly on TPU VMs. A source whose name is a comma-separated list of `.txt`/`.jsonl` paths or globs is a
set of local files, prepared once into `<cache_dir>/tfds`.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from pathlib import Path

import tensorflow_datasets as tfds

from llama_jax.config import DataSource, nearest
from llama_jax.data.local_text import SUFFIXES, local_builder

DEFAULT_CACHE_DIR = Path("~/.cache/llama_jax")


def cache_root(cache_dir: str | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE_DIR.expanduser()


def is_local(name: str) -> bool:
    """True when `name` lists local text files (every comma-separated entry ends in .txt or .jsonl)."""
    return all(part.strip().endswith(SUFFIXES) for part in name.split(","))


def local_files(name: str) -> list[Path]:
    """Expand comma-separated paths/globs, in order; every entry must match at least one file."""
    files = []
    for part in (p.strip() for p in name.split(",")):
        matches = sorted(glob.glob(str(Path(part).expanduser())))
        if not matches:
            raise FileNotFoundError(f"no file matches '{part}' (data source name); check the path or glob")
        files.extend(Path(m) for m in matches)
    return files


def open_source(source: DataSource, data_dir: str | None, cache_dir: str | None) -> tfds.core.DatasetBuilder:
    """The prepared TFDS builder behind `source` (local files are prepared on first use)."""
    if is_local(source.name):
        builder = local_builder(local_files(source.name), source.text_feature, cache_root(cache_dir) / "tfds")
        feature = "text"
    else:
        try:
            builder = tfds.builder(source.name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            base = source.name.split("/")[0].split(":")[0]
            hint = nearest(base, tfds.list_builders())
            raise ValueError(f"data source '{source.name}' is neither a TFDS dataset{hint} nor "
                             f"{'/'.join(SUFFIXES)} files; fix the source's name") from None
        builder.download_and_prepare()
        feature = source.text_feature
    if feature not in builder.info.features:
        raise ValueError(f"dataset '{source.name}' has no feature '{feature}' (it has {list(builder.info.features)}); "
                         "set the source's text_feature")
    return builder


def source_id(source: DataSource, builder: tfds.core.DatasetBuilder) -> str:
    """A name that identifies the exact text of `source` (dataset, config, version, split, feature)."""
    feature = "text" if is_local(source.name) else source.text_feature
    return f"{builder.info.full_name}/{source.split}/{feature}"


def documents(source: DataSource, builder: tfds.core.DatasetBuilder, holdout: float = 0.0,
              tail: bool = False) -> Iterator[str]:
    """The source's documents in dataset order.

    With `holdout > 0` the text is cut by characters: the first `1 - holdout` of it (or, with `tail`, the rest),
    cutting through a document if needed — so a one-document corpus such as tiny_shakespeare still splits.
    """
    feature = "text" if is_local(source.name) else source.text_feature

    def read() -> Iterator[str]:
        ds = builder.as_dataset(split=source.split, shuffle_files=False).map(lambda ex: ex[feature])
        for text in ds.as_numpy_iterator():
            yield text.decode("utf-8")

    if holdout <= 0:
        yield from read()
        return
    cut = round(sum(len(doc) for doc in read()) * (1 - holdout))
    pos = 0
    for doc in read():
        part = doc[max(0, cut - pos):] if tail else doc[:max(0, cut - pos)]
        pos += len(doc)
        if part:
            yield part
