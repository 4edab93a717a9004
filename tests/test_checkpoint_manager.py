"""Training checkpoints: round trip onto another mesh, fallback from a corrupted newest step, params readers."""

import logging
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from llama_jax.checkpoints.manager import Checkpointer, load_params, read_config
from llama_jax.config import CheckpointConfig, Config, LlamaConfig, MeshConfig, OptimConfig
from llama_jax.sharding import make_mesh
from llama_jax.training.step import Trainer


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
    target = trainer.abstract_state()
    return trainer, Checkpointer(run_dir, CheckpointConfig()).restore_latest(target.params, target.opt_state)


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


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
    assert "checkpoint step 2" in caplog.text and "falling back to step 1" in caplog.text
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


def test_load_params_and_config(trained):
    cfg, run_dir, saved = trained
    model_cfg, params = load_params(run_dir)
    assert model_cfg == cfg.model and read_config(run_dir / "1").optim == cfg.optim
    assert_trees_equal(params, saved[2][0])
    _, params = load_params(run_dir / "1", mesh=make_mesh(MeshConfig(1, 8, 1)))
    assert_trees_equal(params, saved[1][0])
    with pytest.raises(FileNotFoundError, match="no llama_jax training checkpoint"):
        load_params(run_dir / "tensorboard")


def test_load_pretrained_reads_training_checkpoints(trained):
    from llama_jax import load_pretrained
    _, run_dir, saved = trained
    model = load_pretrained(run_dir)
    assert_trees_equal(nnx.state(model), saved[2][0])
    model = load_pretrained(run_dir, scan_layers=True)  # the generic Meta-tensor path
    np.testing.assert_array_equal(np.asarray(model.layers.attention.wq[...][0]),
                                  np.asarray(saved[2][0]["layers"][0]["attention"]["wq"][...]))
