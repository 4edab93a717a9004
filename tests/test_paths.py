"""Run dirs and checkpoints on gs:// URIs, tested offline against a fake bucket.

`fake_bucket` routes every epath call on a `gs://bucket/...` path to a local directory (etils' `mock_epath`), so a
code path that mangles the URI or bypasses epath (pathlib, open, os) leaves the bucket empty and the test fails.
Orbax writes and reads arrays through TensorStore's own GCS driver, not epath, so array restores are redirected to
the same directory after asserting they were asked for the unmangled URI.
"""

import os
import struct
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils.epath import gpath
from etils.epath.testing import mock_epath
from flax import nnx
from orbax.checkpoint._src.path import gcs_utils
from tensorboardX.proto.event_pb2 import Event

from llama_jax.checkpoints import load_pretrained, save_pretrained
from llama_jax.checkpoints.io import detect_format
from llama_jax.checkpoints.manager import Checkpointer
from llama_jax.config import CheckpointConfig, Config, DataConfig, DataSource, LlamaConfig
from llama_jax.data import provision_tokenizer
from llama_jax.model import Llama
from llama_jax.paths import absolute, as_path, is_remote, local_copy_path
from llama_jax.training.metrics import MetricsLogger

TINY = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=16)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """(URI of a fake bucket, the local directory holding its objects)."""
    root = tmp_path / "gcs"

    def local(path):
        text = os.fspath(path)
        return str(root / text.removeprefix("gs://")) if text.startswith("gs://") else text

    def one(fn, path, *args, **kwargs):
        return fn(local(path), *args, **kwargs)

    def two(fn, path, dst, *args, **kwargs):
        return fn(local(path), local(dst), *args, **kwargs)

    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # else gs:// bypasses the mock for tf.io.gfile
    # Orbax asks google-cloud-storage (installed on TPU VMs, not here) whether a bucket has a hierarchical namespace.
    monkeypatch.setattr(gcs_utils, "get_bucket", lambda name: SimpleNamespace(hierarchical_namespace_enabled=False))
    with mock_epath(open=one, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one, remove=one, rmtree=one,
                    stat=one, copy=two, rename=two, replace=two):
        yield "gs://bucket", root / "bucket"


@pytest.fixture
def redirected_restores(bucket, monkeypatch):
    """Orbax array restores of gs:// paths read the fake bucket; yields the list of paths asked for."""
    uri, root = bucket
    asked = []
    original = ocp.StandardCheckpointer.restore

    def restore(self, directory, *args, **kwargs):
        asked.append(str(directory))
        return original(self, Path(str(directory).replace(uri, str(root))), *args, **kwargs)

    monkeypatch.setattr(ocp.StandardCheckpointer, "restore", restore)
    return asked


def test_uris_survive_and_local_paths_are_unchanged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = "gs://bucket/runs/name"
    assert is_remote(uri) and not is_remote("runs/name") and not is_remote(tmp_path)
    assert str(as_path(uri)) == uri and str(as_path(uri) / "tokenizer.model") == uri + "/tokenizer.model"
    assert str(absolute(uri)) == uri and str(absolute(as_path(uri) / "7")) == uri + "/7"
    assert type(as_path("runs/name")) is type(Path()) and absolute("runs/name") == tmp_path / "runs" / "name"
    assert local_copy_path("runs/x.model", "cache") == Path("runs/x.model")
    cached = local_copy_path(uri + "/tokenizer.model", tmp_path / "cache")
    assert cached.name == "tokenizer.model" and cached.is_relative_to(tmp_path / "cache")
    assert cached != local_copy_path("gs://bucket/runs/other/tokenizer.model", tmp_path / "cache")


def test_checkpointer_keeps_the_uri(bucket, tmp_path, monkeypatch):
    uri, root = bucket
    ckpt = Checkpointer(uri + "/run", CheckpointConfig())
    assert str(ckpt.directory) == uri + "/run" and root.joinpath("run").is_dir()  # orbax created it through epath
    ckpt.close()
    monkeypatch.chdir(tmp_path)
    local = Checkpointer("local_run", CheckpointConfig())
    assert local.directory == tmp_path / "local_run" and type(local.directory) is type(Path())
    local.close()


def _tokenizer_config(tmp_path) -> Config:
    corpus = tmp_path / "corpus.txt"
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "was", "happy"]
    rng = np.random.default_rng(0)
    corpus.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(400)))
    data = DataConfig(sources=[DataSource(name=str(corpus))], cache_dir=str(tmp_path / "cache"),
                      tokenizer_vocab_size=300)
    return Config(model=TINY, data=data)


def test_tokenizer_is_uploaded_to_and_read_back_from_a_remote_run_dir(bucket, tmp_path):
    uri, root = bucket
    cfg = _tokenizer_config(tmp_path)
    trained = provision_tokenizer(cfg, uri + "/run")
    uploaded = root / "run" / "tokenizer.model"
    assert uploaded.is_file() and (root / "run" / "tokenizer.vocab").is_file()
    assert uploaded.read_bytes() == trained.sp.serialized_model_proto()
    cached = local_copy_path(uri + "/run/tokenizer.model", cfg.data.cache_dir)
    cached.unlink()  # a fresh host: the model must come from the bucket
    again = provision_tokenizer(cfg, uri + "/run")
    assert cached.is_file() and again.sp.serialized_model_proto() == uploaded.read_bytes()
    assert not Path("gs:").exists()


def _scalars(events_file: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of a TensorBoard event file (records: u64 length, u32 crc, payload, u32 crc)."""
    data, out, pos = events_file.read_bytes(), {}, 0
    while pos < len(data):
        (length,) = struct.unpack_from("Q", data, pos)
        event = Event.FromString(data[pos + 12:pos + 12 + length])
        pos += 16 + length
        for value in event.summary.value:
            out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_metrics_logger_writes_events_and_plot_to_a_remote_run_dir(bucket):
    uri, root = bucket
    logger = MetricsLogger(uri + "/run", total_steps=2)
    logger.log(1, {"loss": 5.0})
    logger.log(2, {"loss": 4.0})
    png = logger.plot()
    staging = logger._staging
    logger.close()
    assert str(png) == uri + "/run/loss.png" and (root / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (events,) = (root / "run" / "tensorboard").iterdir()
    assert events.name.startswith("events.out.tfevents") and _scalars(events)["train/loss"] == [(1, 5.0), (2, 4.0)]
    assert not staging.exists()


def _assert_same_params(a: Llama, b: Llama) -> None:
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_load_pretrained_orbax_from_a_uri(bucket, redirected_restores):
    uri, root = bucket
    model = Llama(TINY, rngs=nnx.Rngs(0))
    save_pretrained(model, root / "model", format="orbax")
    assert detect_format(uri + "/model") == "orbax"
    loaded = load_pretrained(uri + "/model")
    assert redirected_restores == [uri + "/model/params"]
    _assert_same_params(model, loaded)


def test_load_pretrained_run_from_a_uri(bucket, redirected_restores):
    uri, root = bucket
    model = Llama(TINY, rngs=nnx.Rngs(0))
    ckpt = Checkpointer(root / "run", CheckpointConfig(async_save=False))
    ckpt.save(3, nnx.state(model, nnx.Param), {"count": np.zeros(())}, {}, Config(model=TINY))
    ckpt.close()
    assert detect_format(uri + "/run") == "orbax"
    loaded = load_pretrained(uri + "/run")
    assert redirected_restores == [uri + "/run/3/params"]
    _assert_same_params(model, loaded)


def test_local_only_formats_refuse_uris_in_one_line(bucket):
    uri, root = bucket
    (root / "hf").mkdir(parents=True)
    (root / "hf" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="local paths only; copy it to local disk first") as err:
        detect_format(uri + "/hf")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="local paths only"):
        save_pretrained(Llama(TINY, rngs=nnx.Rngs(0)), uri + "/out", format="hf")
    assert not (root / "out").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        detect_format(uri + "/missing")


def test_convert_reads_a_uri_like_load_pretrained(bucket, redirected_restores, tmp_path):
    """`convert` accepts the same path kinds as `load_pretrained`: an orbax directory on gs:// becomes local HF."""
    from llama_jax.checkpoints.convert import convert

    uri, root = bucket
    model = Llama(TINY, rngs=nnx.Rngs(0))
    save_pretrained(model, root / "model", format="orbax")
    out = convert(uri + "/model", tmp_path / "hf", "hf")
    assert redirected_restores == [uri + "/model/params"] and detect_format(out) == "hf"
    _assert_same_params(model, load_pretrained(out))
