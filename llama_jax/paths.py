"""Paths that may live on a cloud bucket (gs://, s3://, ...) or on local disk.

On a TPU pod every host must see the same run directory, so `checkpoint.dir` and `train.init_from` are often
`gs://` URIs. `pathlib.Path` mangles those (`gs://b/x` -> `gs:/b/x`); `etils.epath.Path` keeps them and reads or
writes through tf.io.gfile / fsspec, while local paths behave like `pathlib.Path`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from etils import epath

PathLike = str | os.PathLike
AnyPath = Path | epath.Path


def as_path(path: PathLike) -> AnyPath:
    """A URI as an `epath.Path` (cloud I/O); a local path as the `pathlib.Path` it always was (the local-only
    readers rely on pathlib details such as `stat().st_size`)."""
    return epath.Path(path) if is_remote(path) else Path(path)


def is_remote(path: PathLike) -> bool:
    """True for a URI such as `gs://bucket/run` (anything with a scheme), False for a local path."""
    return "://" in os.fspath(path)


def absolute(path: PathLike) -> AnyPath:
    """Absolute form of a local path (Orbax requires it); a URI unchanged (`absolute()` would mangle it)."""
    path = as_path(path)
    return path if is_remote(path) else path.absolute()


def local_copy_path(path: PathLike, cache_dir: PathLike) -> Path:
    """Where a local copy of the file `path` lives: `path` itself when local, else a file under `cache_dir` named
    after the URI (for libraries such as sentencepiece that read only local files)."""
    if not is_remote(path):
        return Path(path)
    key = hashlib.sha256(os.fspath(path).encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / "remote" / key / as_path(path).name
