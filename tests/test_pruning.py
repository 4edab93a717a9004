"""Pruning: masks against NumPy, masks fixed through optimizer steps and resume, structured pruning that shrinks
the model and round-trips through every format (and loads in transformers with our logits)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax import Llama, load_pretrained, save_pretrained
from llama_jax.checkpoints.layout import iter_meta_tensors, restack
from llama_jax.checkpoints.manager import Checkpointer
from llama_jax.cli import main
from llama_jax.compression.masks import PRUNED, masks_of, projection_sparsity, pruning_masks
from llama_jax.compression.prune import prune_model
from llama_jax.compression.structured import strongest
from llama_jax.config import (CheckpointConfig, Config, ConfigError, ExecutionConfig, LlamaConfig, OptimConfig,
                              PruneConfig)
from llama_jax.sharding import make_mesh
from llama_jax.training.step import Trainer

CFG = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16, max_seq_len=32)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 16)), jnp.int32)
forward = nnx.jit(lambda model, tokens: model(tokens))


@pytest.fixture(scope="module")
def model():
    return Llama(CFG, rngs=nnx.Rngs(0))


def _meta(model):
    """Meta-named `(out, in)` projections of a model as NumPy arrays."""
    return {name: t for name, t in iter_meta_tensors(model) if name.split(".")[-2] in PRUNED}


def _reference_kept(tensors, method, sparsity=0.5):
    """NumPy keep-masks (Meta layout): per matrix or one global magnitude threshold, or 2 of every 4 inputs."""
    if method == "2:4":
        out = {}
        for name, t in tensors.items():
            groups = np.abs(t).reshape(t.shape[0], -1, 4)
            top2 = np.argsort(-groups, axis=-1, kind="stable")[..., :2]
            keep = np.zeros(groups.shape, bool)
            np.put_along_axis(keep, top2, True, axis=-1)
            out[name] = keep.reshape(t.shape)
        return out
    if method == "global":
        everything = np.sort(np.concatenate([np.abs(t).ravel() for t in tensors.values()]))
        threshold = everything[round(sparsity * everything.size) - 1]
        return {name: np.abs(t) > threshold for name, t in tensors.items()}
    return {name: np.abs(t) > np.sort(np.abs(t).ravel())[round(sparsity * t.size) - 1] for name, t in tensors.items()}


@pytest.mark.parametrize("method,scope", [("magnitude", "layer"), ("magnitude", "global"), ("2:4", "layer")])
def test_masks_match_numpy(model, method, scope):
    pruned = prune_model(model, PruneConfig(method=method, sparsity=0.5, scope=scope))
    reference = _reference_kept(_meta(model), "global" if scope == "global" else method)
    for name, tensor in _meta(pruned).items():
        np.testing.assert_array_equal(tensor != 0, reference[name], err_msg=name)
    assert projection_sparsity(nnx.state(pruned, nnx.Param)) == 0.5
    if method == "2:4":  # exactly 2 nonzero weights in every 4 consecutive inputs of every output row
        for tensor in _meta(pruned).values():
            assert np.all(np.count_nonzero(tensor.reshape(tensor.shape[0], -1, 4), axis=-1) == 2)
    norms = [t for name, t in iter_meta_tensors(pruned) if name.split(".")[-2] not in PRUNED]
    assert all(np.count_nonzero(t) == t.size for t in norms)  # embeddings, head and norms stay dense


@pytest.mark.parametrize("method", ["magnitude", "2:4"])
def test_stacked_layers_get_the_same_masks(model, method):
    prune = PruneConfig(method=method)
    params = nnx.state(model, nnx.Param)
    scanned = nnx.state(nnx.eval_shape(lambda: Llama(CFG, ExecutionConfig(scan_layers=True), rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(scanned, restack(nnx.to_pure_dict(params), CFG.n_layers, stacked=True))
    masks = jax.jit(lambda p: pruning_masks(p, prune))
    stacked = restack(nnx.to_pure_dict(masks(scanned)), CFG.n_layers, stacked=False)
    jax.tree.map(np.testing.assert_array_equal, stacked, nnx.to_pure_dict(masks(params)))


def test_bad_prune_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="did you mean 'magnitude'"):
        PruneConfig(method="magnitud")
    with pytest.raises(ConfigError, match=r"prune.sparsity must be in \[0, 1\)"):
        PruneConfig(sparsity=1.0)
    with pytest.raises(ConfigError, match="does not split into groups of 3"):
        pruning_masks(nnx.state(Llama(CFG, rngs=nnx.Rngs(0)), nnx.Param), PruneConfig(method="1:3"))
    cfg = Config(model=CFG, prune=PruneConfig(method="structured"))
    with pytest.raises(ConfigError, match="train on its output with prune.method=none"):
        Trainer(cfg, make_mesh(cfg.mesh))


def test_masked_weights_stay_zero_through_steps_and_resume(model, tmp_path):
    cfg = Config(model=CFG, optim=OptimConfig(lr=1e-2, warmup_steps=1), prune=PruneConfig(method="magnitude"))
    cfg.train.steps = 3
    trainer = Trainer(cfg, make_mesh(cfg.mesh))
    dense = jax.device_get(nnx.state(model, nnx.Param))
    state = trainer.init_state(dense)  # a dense start: the mask comes from its magnitudes
    masks = jax.device_get(masks_of(state.opt_state))
    expected = pruning_masks(dense, cfg.prune)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(masks), nnx.to_pure_dict(expected))
    rng = np.random.default_rng(0)
    for _ in range(3):
        state, metrics = trainer.train_step(state, {"tokens": rng.integers(0, 128, (8, 17)).astype(np.int32)})
    assert bool(metrics["finite"])
    params = jax.device_get(state.params)
    for (path, keep), (_, before) in zip(nnx.to_flat_state(masks), nnx.to_flat_state(dense)):
        after = np.asarray(nnx.to_pure_dict(params) and _at(params, path))
        assert np.all(after[~np.asarray(keep.get_value())] == 0), path
        assert np.any(after != np.asarray(before.get_value())), path  # the kept weights did train
    with Checkpointer(tmp_path / "run", CheckpointConfig(async_save=False)) as ckpt:
        ckpt.save(3, state.params, state.opt_state, {}, cfg)
    resumed = Trainer(cfg, make_mesh(cfg.mesh))
    with Checkpointer(tmp_path / "run", CheckpointConfig()) as ckpt:
        restored = ckpt.restore_latest(cfg.model, cfg.execution, lambda ex: dataclasses.astuple(
            resumed.abstract_state(ex))[1:])
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(jax.device_get(masks_of(restored.opt_state))),
                 nnx.to_pure_dict(masks))


def _at(state, path):
    node = nnx.to_pure_dict(state)
    for key in path:
        node = node[key]
    return node
