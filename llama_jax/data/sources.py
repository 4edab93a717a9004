"""Where text comes from: any TFDS text dataset by name, local `.txt`/`.jsonl`/`.parquet` files via the LocalText
builder, or `hf:` Hugging Face datasets (read through `shards.py`).

TFDS names that work as-is (feature `text` unless noted): `tiny_shakespeare`, `lm1b`, `c4/en:3.0.1` (huge: use a
split slice such as `train[:1%]`), `wikipedia/20230601.en` (features `title`, `text`). Pin the version (`name:X.Y.Z`)
to read exactly the prepared copy you have: with a version tfds reads the files even when its own code has moved on
(it builds C4 3.1.0; the prepared copies in use are 3.0.1). A `data_dir` of `gs://...` is read by tfds directly on
TPU VMs. A source whose name is a comma-separated list of `.txt`/`.jsonl` paths or globs is a set of local files,
prepared once into `<cache_dir>/tfds`.

A dataset missing from `data_dir` is built (`download_and_prepare`) only where `data.allow_download` permits: by
default on single-process runs (the quick start fetches tiny_shakespeare), never on multi-process ones, where every
host would start its own build (for C4 a Dataflow-scale job). With `allow_download: true` process 0 builds it and the
others wait; with `false` (the TPU recipes) a missing dataset is a one-line error saying where to copy it from.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from pathlib import Path

import jax
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils
from tensorflow_datasets.core import constants

from llama_jax.config import DataSource
from llama_jax.data.local_text import SUFFIXES, local_builder
from llama_jax.data.shards import is_hf, source_documents

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


def download_role(allow_download: bool | None, process_index: int, process_count: int) -> str:
    """What this process does about a missing TFDS dataset: 'prepare' it, 'wait' for process 0 to, or 'refuse'.

    `allow_download` None (the default) means: prepare on a single-process run, refuse on a multi-process one.
    """
    allowed = process_count == 1 if allow_download is None else allow_download
    if not allowed:
        return "refuse"
    return "prepare" if process_index == 0 else "wait"


def _find_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder | None:
    """The TFDS builder for `name`, or None when neither `data_dir` nor tfds's code has that dataset/version."""
    try:
        return tfds.builder(name, data_dir=data_dir)
    except (AssertionError, tfds.core.registered.DatasetNotFoundError):  # a version tfds can neither read nor build
        return None


def missing_dataset_message(name: str, data_dir: str | None, allow_download: bool | None, process_count: int,
                            builder: tfds.core.DatasetBuilder | None) -> str:
    """One line: which dataset is missing where, where to copy a prepared one from, and how to build it instead."""
    root = str(data_dir or constants.DATA_DIR).rstrip("/")
    relative = builder.info.full_name if builder is not None else name.replace(":", "/")  # e.g. c4/en/3.0.1
    why = ("tfds cannot build this version" if builder is None else
           "data.allow_download is false" if allow_download is False else
           f"this run has {process_count} processes and data.allow_download is unset")
    fix = "" if builder is None or allow_download is not None else (
        "; or set data.allow_download=true to build it (process 0 builds, the others wait)")
    return (f"dataset '{name}' is not prepared in data_dir {root} (no {root}/{relative}) and {why}; copy a prepared "
            f"TFDS directory there, e.g. gcloud storage cp -r SOURCE_DATA_DIR/{relative} "
            f"{root}/{relative.rsplit('/', 1)[0]}/ (tpu_setup/data.sh dataset does this){fix}")


def prepared_builder(name: str, data_dir: str | None, allow_download: bool | None) -> tfds.core.DatasetBuilder:
    """The TFDS builder for `name`, prepared in `data_dir`; builds a missing one only as `download_role` says."""
    builder = _find_builder(name, data_dir)
    if builder is not None and builder.is_prepared():
        return builder
    index, count = jax.process_index(), jax.process_count()
    role = download_role(allow_download, index, count)
    if builder is None or role == "refuse":
        raise FileNotFoundError(missing_dataset_message(name, data_dir, allow_download, count, builder))
    if role == "prepare":
        builder.download_and_prepare()
    if count > 1:
        multihost_utils.sync_global_devices(f"llama_jax prepared {name}")
    return builder if role == "prepare" else tfds.builder(name, data_dir=data_dir)


def open_source(source: DataSource, data_dir: str | None, cache_dir: str | None,
                allow_download: bool | None = None) -> tfds.core.DatasetBuilder | None:
    """The prepared TFDS builder behind `source` (local files are prepared on first use); None for `hf:` sources,
    which are read through `shards.py`."""
    if is_hf(source.name):
        return None
    if is_local(source.name):
        builder = local_builder(local_files(source.name), source.text_feature, cache_root(cache_dir) / "tfds")
        feature = "text"
    else:
        builder = prepared_builder(source.name, data_dir, allow_download)
        feature = source.text_feature
    if feature not in builder.info.features:
        raise ValueError(f"dataset '{source.name}' has no feature '{feature}' (it has {list(builder.info.features)}); "
                         "set the source's text_feature")
    return builder


def source_id(source: DataSource, builder: tfds.core.DatasetBuilder | None) -> str:
    """A name that identifies the exact text of `source` (dataset, config, version, split, feature)."""
    feature = "text" if is_local(source.name) else source.text_feature
    return f"{builder.info.full_name if builder else source.name}/{source.split}/{feature}"


def documents(source: DataSource, builder: tfds.core.DatasetBuilder | None, holdout: float = 0.0,
              tail: bool = False, data_dir: str | None = None) -> Iterator[str]:
    """The source's documents in dataset order.

    With `holdout > 0` the text is cut by characters: the first `1 - holdout` of it (or, with `tail`, the rest),
    cutting through a document if needed — so a one-document corpus such as tiny_shakespeare still splits.
    """
    feature = "text" if is_local(source.name) else source.text_feature

    def read() -> Iterator[str]:
        if builder is None:
            yield from source_documents(source, data_dir)
            return
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
