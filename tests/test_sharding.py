"""Sharded forward passes on 8 simulated CPU devices: same logits on every mesh, parameters really split."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from llama_jax import Llama, LlamaConfig
from llama_jax.config import ConfigError, ExecutionConfig, MeshConfig
from llama_jax.sharding import (abstract_init, bytes_per_device, check_model_fits, compile_init, logical_spec,
                                make_mesh, sharded_init)

CFG = LlamaConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=256, multiple_of=32, max_seq_len=64)
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]


def _tokens() -> jax.Array:
    return jnp.asarray(np.random.RandomState(0).randint(0, CFG.vocab_size, (8, 16)), jnp.int32)


def _one_device_model(execution: ExecutionConfig | None = None) -> Llama:
    return sharded_init(lambda: Llama(CFG, execution, rngs=nnx.Rngs(0)),
                        make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1]))


@pytest.fixture(scope="module")
def reference_logits() -> np.ndarray:
    return np.asarray(_one_device_model()(_tokens()))


def test_sharded_init_is_scan_independent_with_few_programs(reference_logits):
    """Per-parameter draws: the same values with scanned layers (and, by the logits test below, on every mesh); the
    number of compiled programs does not grow with depth; LeCun std and unit norms as the eager constructor has."""
    model = _one_device_model()
    scanned = dict(nnx.to_flat_state(nnx.state(_one_device_model(ExecutionConfig(scan_layers=True)))))
    for path, var in nnx.to_flat_state(nnx.state(model)):
        expected = scanned[path[:1] + path[2:]][...][path[1]] if path[0] == "layers" else scanned[path][...]
        np.testing.assert_array_equal(np.asarray(expected), np.asarray(var[...]))
    wq = np.asarray(model.layers[1].attention.wq[...])
    assert abs(wq.std() * np.sqrt(CFG.dim) - 1) < 0.05 and abs(wq.mean()) < 0.01
    np.testing.assert_array_equal(np.asarray(model.norm.weight[...]), 1.0)
    assert not np.array_equal(wq, np.asarray(model.layers[0].attention.wq[...]))

    deep = dataclasses.replace(CFG, n_layers=12)
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    assert compile_init(lambda: Llama(deep, rngs=nnx.Rngs(0)), mesh) <= 8  # per (initializer, shape), not per layer


@pytest.mark.parametrize("shape", MESHES, ids=str)
def test_forward_is_mesh_independent_and_params_are_sharded(shape, reference_logits):
    mesh = make_mesh(MeshConfig(*shape))
    model = sharded_init(lambda: Llama(CFG, rngs=nnx.Rngs(0)), mesh)
    data, fsdp, tensor = shape
    wq = model.layers[0].attention.wq[...]
    assert wq.sharding.spec == logical_spec(("embed", "heads", "head_dim"), wq.shape, mesh)
    assert wq.addressable_shards[0].data.shape == (CFG.dim // fsdp, CFG.n_heads // tensor, CFG.head_dim)
    emb = model.tok_embeddings[...]
    assert emb.addressable_shards[0].data.shape == (CFG.vocab_size // tensor, CFG.dim // fsdp)
    w2 = model.layers[1].feed_forward.w2[...]
    assert w2.addressable_shards[0].data.shape == (CFG.hidden_dim // tensor, CFG.dim // fsdp)

    with jax.set_mesh(mesh):
        logits = jax.jit(lambda m, t: m(t))(model, _tokens())
    assert logits.sharding.spec[0] in (("data", "fsdp"), "data", "fsdp")
    np.testing.assert_allclose(np.asarray(logits), reference_logits, atol=1e-5, rtol=0)


def test_scan_layers_shard_with_a_leading_layer_axis():
    mesh = make_mesh(MeshConfig(1, 4, 2))
    cfg = CFG
    model = sharded_init(lambda: Llama(cfg, ExecutionConfig(scan_layers=True), rngs=nnx.Rngs(0)), mesh)
    w1 = model.layers.feed_forward.w1[...]
    assert w1.shape == (cfg.n_layers, cfg.dim, cfg.hidden_dim)
    assert w1.sharding.spec == P(None, "fsdp", "tensor")


def test_mesh_sizes_resolve_and_errors_are_clear():
    assert dict(make_mesh(MeshConfig(2, -1, 2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ConfigError, match="does not divide the 8 devices"):
        make_mesh(MeshConfig(3, -1, 1))
    with pytest.raises(ConfigError, match="there are 8 devices"):
        make_mesh(MeshConfig(2, 2, 1))
    with pytest.raises(ConfigError, match="at most one"):
        make_mesh(MeshConfig(-1, -1, 1))
    with pytest.raises(ConfigError, match="n_heads=6"):
        check_model_fits(LlamaConfig(dim=48, n_layers=1, n_heads=6, vocab_size=64), make_mesh(MeshConfig(1, 2, 4)))


def test_axes_that_do_not_divide_are_replicated():
    mesh = make_mesh(MeshConfig(1, 2, 4))
    assert logical_spec(("embed", "kv_heads", "head_dim"), (64, 2, 8), mesh) == P("fsdp", None, None)
    assert logical_spec(("batch", "seq"), (3, 16), mesh) == P(None, None)
    assert logical_spec(("batch", "seq"), (2, 16), mesh) == P("fsdp", None)


@pytest.mark.parametrize("preset,count", [("llama2-7b", 6_738_415_616), ("llama2-13b", 13_015_864_320),
                                          ("llama2-70b", 68_976_648_192)])
def test_abstract_init_param_counts(preset, count):
    cfg = LlamaConfig.preset(preset)
    mesh = make_mesh(MeshConfig(1, 8, 1))
    _, state = abstract_init(lambda: Llama(cfg, ExecutionConfig(scan_layers=True), rngs=nnx.Rngs(0)), mesh)
    leaves = jax.tree.leaves(state)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert sum(int(np.prod(x.shape)) for x in leaves) == count == cfg.num_params()
    assert bytes_per_device(state) < 4 * count / 8 * 1.01  # fully sharded but the tiny norms
