"""Training checkpoints: round trip onto another mesh or layout, fallback from a corrupted newest step, refusal of
another architecture, and `load_pretrained` on run directories."""

import dataclasses
import json
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax.checkpoints.manager import Checkpointer
from llama_jax.config import CheckpointConfig, Config, ConfigError, ExecutionConfig, LlamaConfig, MeshConfig, OptimConfig
from llama_jax.sharding import make_mesh
from llama_jax.training.step import Trainer, TrainState


def tiny_config() -> Config:
    cfg = Config()
    cfg.model = LlamaConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
                            max_seq_len=32)
    cfg.optim = OptimConfig(lr=1e-2, warmup_steps=1)
    cfg.train.steps = 10
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run dir with steps 1 and 2 saved from a (2, 2, 2) mesh, and the host copies of what was saved."""
    cfg = tiny_config()
    trainer = Trainer(cfg, make_mesh(MeshConfig(2, 2, 2)))
    state = trainer.init_state()
    run_dir = tmp_path_factory.mktemp("run")
    ckpt = Checkpointer(run_dir, CheckpointConfig(max_to_keep=3, async_save=True))
    tokens = np.random.default_rng(0).integers(0, 256, (8, 33)).astype(np.int32)
    saved = {}
    for step in (1, 2):
        state, _ = trainer.train_step(state, {"tokens": tokens})
        ckpt.save(step, state.params, state.opt_state, {"position": step * 10}, cfg)
        saved[step] = jax.device_get((state.params, state.opt_state))
    ckpt.close()
    return cfg, run_dir, saved


def restore(cfg, run_dir, mesh_shape):
    trainer = Trainer(cfg, make_mesh(MeshConfig(*mesh_shape)))

    def abstract_state(execution):
        state = trainer.abstract_state(execution)
        return state.params, state.opt_state

    return trainer, Checkpointer(run_dir, CheckpointConfig()).restore_latest(cfg.model, cfg.execution, abstract_state)


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.e2e
def test_restore_onto_a_different_mesh(trained):
    cfg, run_dir, saved = trained
    trainer, restored = restore(cfg, run_dir, (1, 4, 2))
    assert restored.step == 2 and restored.data_state == {"position": 20}
    assert_trees_equal((restored.params, restored.opt_state), saved[2])
    wq = restored.params["layers"][0]["attention"]["wq"][...]
    assert wq.sharding.mesh.shape == {"data": 1, "fsdp": 4, "tensor": 2}
    assert wq.sharding.spec == trainer.state_sharding.params["layers"][0]["attention"]["wq"].get_value().spec


def test_corrupted_newest_checkpoint_falls_back_loudly(trained, tmp_path, caplog, capfd):
    cfg, run_dir, saved = trained

    shutil.copytree(run_dir, tmp_path / "run")
    for f in (tmp_path / "run" / "2" / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"\0garbage" * 8)
    with caplog.at_level(logging.WARNING):
        _, restored = restore(cfg, tmp_path / "run", (8, 1, 1))
    assert restored.step == 1 and restored.data_state == {"position": 10}
    assert_trees_equal((restored.params, restored.opt_state), saved[1])
    assert "checkpoint step 2" in caplog.text and "resuming from step 1" in caplog.text
    assert "WARNING: checkpoint step 2" in capfd.readouterr().err
    assert not (tmp_path / "run" / "2").exists() and list((tmp_path / "run").glob("corrupt-2-*"))


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(trained, tmp_path):
    cfg, run_dir, _ = trained

    shutil.copytree(run_dir, tmp_path / "run")
    for step in ("1", "2"):
        shutil.rmtree(tmp_path / "run" / step / "params")
        (tmp_path / "run" / step / "params").mkdir()
    with pytest.raises(ValueError, match="no readable checkpoint"):
        restore(cfg, tmp_path / "run", (8, 1, 1))


def test_load_pretrained_reads_run_and_step_directories(trained, tmp_path):
    from llama_jax import load_pretrained
    from llama_jax.checkpoints import detect_format
    _, run_dir, saved = trained
    assert detect_format(run_dir) == detect_format(run_dir / "1") == "orbax"
    assert_trees_equal(nnx.state(load_pretrained(run_dir)), saved[2][0])
    model = load_pretrained(run_dir / "1", make_mesh(MeshConfig(1, 8, 1)))
    assert_trees_equal(nnx.state(model), saved[1][0])
    assert model.layers[0].attention.wq[...].sharding.mesh.shape["fsdp"] == 8
    model = load_pretrained(run_dir, scan_layers=True, dtype="bfloat16")  # restacked and cast after reading
    np.testing.assert_array_equal(np.asarray(model.layers.attention.wq[...][0]),
                                  np.asarray(saved[2][0]["layers"][0]["attention"]["wq"][...]).astype(jnp.bfloat16))
    (tmp_path / "1").mkdir()  # a step-like directory without parameters
    with pytest.raises(ValueError, match="is not a known checkpoint layout"):
        load_pretrained(tmp_path)


def test_a_stored_run_config_with_unknown_training_keys_still_loads(trained, tmp_path):
    """Renaming or adding training keys must never make old runs unloadable: loading reads only `model/`."""
    from llama_jax import load_pretrained
    from llama_jax.checkpoints.orbax_format import read_json_item
    _, run_dir, saved = trained
    shutil.copytree(run_dir, tmp_path / "run")
    config_item = tmp_path / "run" / "2" / "config"
    raw = read_json_item(config_item)
    raw["train"]["renamed_knob"] = raw["train"].pop("log_every")
    raw["optim"]["brand_new_key"] = 3
    (config_item / "metadata").write_text(json.dumps(raw))
    assert read_json_item(config_item)["optim"]["brand_new_key"] == 3
    assert_trees_equal(nnx.state(load_pretrained(tmp_path / "run")), saved[2][0])


def test_resume_with_another_architecture_refuses_and_touches_nothing(trained, tmp_path):
    cfg, run_dir, _ = trained
    shutil.copytree(run_dir, tmp_path / "run")
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    other = Config(model=dataclasses.replace(cfg.model, dim=128), optim=cfg.optim, train=cfg.train)
    with pytest.raises(ConfigError, match=r"written for another model \(stored vs config: dim: 64 vs 128; hidden_dim: 192 vs 352\)"):
        restore(other, tmp_path / "run", (8, 1, 1))
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("execution", [ExecutionConfig(scan_layers=True), ExecutionConfig(param_dtype="bfloat16")],
                         ids=["scan_layers", "param_dtype"])
def test_resume_onto_another_execution_layout(trained, execution):
    """A run saved unrolled in float32 resumes scanned (params and Adam moments restacked) or in bfloat16."""
    cfg, run_dir, saved = trained
    other = Config(model=cfg.model, execution=execution, optim=cfg.optim, train=cfg.train)
    trainer, restored = restore(other, run_dir, (2, 2, 2))
    assert restored.step == 2
    params = nnx.to_pure_dict(restored.params)
    want = np.asarray(saved[2][0]["layers"][0]["feed_forward"]["w1"][...])
    got = params["layers"]["feed_forward"]["w1"][0] if execution.scan_layers else params["layers"][0]["feed_forward"]["w1"]
    np.testing.assert_array_equal(np.asarray(got), want.astype(execution.param_dtype))
    target = trainer.abstract_state()
    for leaf, expected in zip(jax.tree.leaves((restored.params, restored.opt_state)),
                              jax.tree.leaves((target.params, target.opt_state)), strict=True):
        assert leaf.shape == expected.shape and leaf.dtype == expected.dtype and leaf.sharding == expected.sharding
    tokens = np.random.default_rng(1).integers(0, 256, (8, 33)).astype(np.int32)
    step = jax.device_put(np.int32(2), trainer.state_sharding.step)
    _, metrics = trainer.train_step(TrainState(step, restored.params, restored.opt_state), {"tokens": tokens})
    assert np.isfinite(float(metrics["loss"]))


def snapshot(root):
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_unreadable_newest_with_a_mismatched_older_step_touches_nothing(trained, tmp_path):
    """Nothing is renamed before a step restores: a refusal further down leaves even the damaged step in place."""
    cfg, run_dir, _ = trained
    shutil.copytree(run_dir, tmp_path / "run")
    (tmp_path / "run" / "2" / "model" / "metadata").write_text("{truncated")
    before = snapshot(tmp_path / "run")
    other = Config(model=dataclasses.replace(cfg.model, n_layers=2), optim=cfg.optim, train=cfg.train)
    with pytest.raises(ConfigError, match="checkpoint step 1 .* written for another model"):
        restore(other, tmp_path / "run", (8, 1, 1))
    assert snapshot(tmp_path / "run") == before


def test_damaged_description_falls_back_and_no_readable_step_renames_nothing(trained, tmp_path):
    cfg, run_dir, saved = trained
    shutil.copytree(run_dir, tmp_path / "run")
    (tmp_path / "run" / "2" / "model" / "metadata").write_text("{truncated")
    _, restored = restore(cfg, tmp_path / "run", (8, 1, 1))
    assert restored.step == 1 and (tmp_path / "run" / "1").is_dir() and list((tmp_path / "run").glob("corrupt-2-*"))
    assert_trees_equal((restored.params, restored.opt_state), saved[1])

    shutil.rmtree(tmp_path / "run")
    shutil.copytree(run_dir, tmp_path / "run")
    for step in ("1", "2"):
        (tmp_path / "run" / step / "model" / "metadata").write_text("{truncated")
    before = snapshot(tmp_path / "run")
    with pytest.raises(ValueError, match="no readable checkpoint .* nothing was changed"):
        restore(cfg, tmp_path / "run", (8, 1, 1))
    assert snapshot(tmp_path / "run") == before


def test_machine_failures_never_set_a_step_aside(trained, tmp_path, monkeypatch):
    """Out of memory (or permissions, network) while restoring is not the step's fault: re-raised, nothing moved."""
    cfg, run_dir, _ = trained
    shutil.copytree(run_dir, tmp_path / "run")
    before = snapshot(tmp_path / "run")

    def oom(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory allocating 12 GiB")

    monkeypatch.setattr(Checkpointer, "_restore", oom)
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        restore(cfg, tmp_path / "run", (8, 1, 1))
    assert snapshot(tmp_path / "run") == before


def test_run_lock_refuses_a_second_writer_and_takes_over_a_dead_owner(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from llama_jax.checkpoints.lock import RunLock
    with RunLock(tmp_path / "run") as lock:
        owner = json.loads(lock.path.read_text())
        assert owner["host"] == socket.gethostname() and owner["pid"] == os.getpid()
        with pytest.raises(ConfigError, match=f"in use by pid {os.getpid()} on host {socket.gethostname()}"):
            RunLock(tmp_path / "run").__enter__()
        RunLock(tmp_path / "run", owner=False).__enter__()  # other processes of the same run take no lock
    assert not lock.path.parent.exists()  # the lock made the directory and nothing was written: no trace left

    lock.path.parent.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.path.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": "1"}))
    with RunLock(tmp_path / "run"):
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.path.write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(ConfigError, match=f"delete {lock.path} if that job has ended"):
        RunLock(tmp_path / "run").__enter__()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="checkpoint.dir .* is a file"):
        RunLock(tmp_path / "file").__enter__()
