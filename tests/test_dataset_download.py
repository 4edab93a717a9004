"""No accidental dataset builds: a missing TFDS dataset is prepared only where `data.allow_download` permits (by
process 0 alone, the others waiting), and otherwise fails at once with one line saying where to copy it from."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import pytest
import tensorflow_datasets as tfds

from llama_jax.data import sources
from llama_jax.data.sources import download_role, prepared_builder

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "experiments" / "configs").glob("llama2_*.yaml"))


@pytest.mark.parametrize("allow, index, count, role", [
    (None, 0, 1, "prepare"),  # the quick start: one process fetches tiny_shakespeare
    (None, 0, 4, "refuse"), (None, 3, 4, "refuse"),  # pods never build unless asked
    (True, 0, 4, "prepare"), (True, 1, 4, "wait"), (True, 0, 1, "prepare"),
    (False, 0, 1, "refuse"), (False, 2, 4, "refuse"),
])
def test_download_role(allow, index, count, role):
    assert download_role(allow, index, count) == role


@pytest.fixture
def no_builds(monkeypatch):
    """Any dataset build in this process fails the test."""
    def build(*args, **kwargs):
        raise AssertionError("download_and_prepare was called")
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", build)


def processes(monkeypatch, index: int, count: int) -> None:
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(jax, "process_count", lambda: count)


@pytest.mark.parametrize("name, allow, count, reason", [
    ("tiny_shakespeare:1.0.0", False, 1, "data.allow_download is false"),
    ("tiny_shakespeare", None, 2, "this run has 2 processes and data.allow_download is unset"),
])
def test_missing_dataset_is_one_line_and_builds_nothing(tmp_path, monkeypatch, no_builds, name, allow, count, reason):
    processes(monkeypatch, 0, count)
    with pytest.raises(FileNotFoundError) as err:
        prepared_builder(name, str(tmp_path), allow)
    message = str(err.value)
    assert "\n" not in message and reason in message
    assert f"'{name}' is not prepared in data_dir {tmp_path} (no {tmp_path}/tiny_shakespeare/1.0.0)" in message
    assert f"gcloud storage cp -r SOURCE_DATA_DIR/tiny_shakespeare/1.0.0 {tmp_path}/tiny_shakespeare/" in message
    assert ("data.allow_download=true" in message) == (allow is None)
    assert list(tmp_path.iterdir()) == []


def test_a_version_tfds_cannot_build_is_named(tmp_path, no_builds):
    with pytest.raises(FileNotFoundError, match="'c4/en:3.0.1' is not prepared .* tfds cannot build this version"):
        prepared_builder("c4/en:3.0.1", str(tmp_path), True)


def test_pinned_version_reads_the_prepared_copy(tfds_dir, monkeypatch, no_builds):
    processes(monkeypatch, 0, 4)
    builder = prepared_builder("tiny_shakespeare:1.0.0", str(tfds_dir), False)
    assert builder.info.full_name == "tiny_shakespeare/1.0.0" and builder.is_prepared()


def test_other_processes_wait_for_process_0(tmp_path, tfds_dir, monkeypatch, no_builds):
    """Process 1 never builds: it waits at the barrier, behind which process 0 has prepared the dataset."""
    processes(monkeypatch, 1, 2)
    barriers = []

    def barrier(name):  # process 0 finishes its build while process 1 waits here
        barriers.append(name)
        shutil.copytree(tfds_dir / "tiny_shakespeare", tmp_path / "tiny_shakespeare")
    monkeypatch.setattr(sources.multihost_utils, "sync_global_devices", barrier)
    builder = prepared_builder("tiny_shakespeare", str(tmp_path), True)
    assert barriers == ["llama_jax prepared tiny_shakespeare"] and builder.is_prepared()
    assert builder.info.splits["train"].num_examples == 1


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipes_pin_dataset_versions_and_never_download(recipe):
    from llama_jax.config import load_config
    data = load_config(recipe).data
    assert data.allow_download is False
    for source in [*data.sources, data.validation]:
        assert source.name == "c4/en:3.0.1", source


@pytest.mark.e2e
def test_recipe_without_the_dataset_fails_fast_on_every_host(tmp_path, tokenizer_32k):
    """Two processes of one cluster run the 7B recipe against an empty data dir: each exits with the one-line error
    right after start-up (the whole test took 17 s on 2 cores, mostly importing jax and TensorFlow) and nothing is
    written there."""
    data_dir = tmp_path / "tensorflow_datasets"
    data_dir.mkdir()
    with socket.socket() as sock:  # a free port for the coordinator
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    recipe = REPO / "experiments" / "configs" / "llama2_7b_v4_16.yaml"
    command = [sys.executable, "-m", "llama_jax", "train", "--config", str(recipe), f"data.data_dir={data_dir}",
               f"data.tokenizer={tokenizer_32k}", f"checkpoint.dir={tmp_path / 'run'}"]
    procs = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                   "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i),
                                   "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
             for i in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]  # a build would still be running
    for proc, (_, err) in zip(procs, outs):
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert proc.returncode == 2 and len(errors) == 1, err[-2000:]
        assert "dataset 'c4/en:3.0.1' is not prepared in data_dir" in errors[0]
    assert list(data_dir.iterdir()) == [] and not (tmp_path / "run").exists()
