"""Pruning: masks against NumPy, masks fixed through optimizer steps and resume, structured pruning that shrinks
the model and round-trips through every format (and loads in transformers with our logits)."""

import dataclasses
from pathlib import Path

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
from llama_jax.config import (CheckpointConfig, Config, ConfigError, ExecutionConfig, LlamaConfig, MeshConfig,
                              OptimConfig, PruneConfig)
from llama_jax.sharding import make_mesh
from llama_jax.training.step import Trainer

REPO = Path(__file__).resolve().parents[1]
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


def test_stacked_layers_get_the_same_masks(model):
    prune = PruneConfig(method="magnitude")  # per layer: each layer of a stacked array keeps its own threshold
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


@pytest.mark.e2e
def test_masked_weights_stay_zero_through_steps_and_resume(model, tmp_path):
    cfg = Config(model=CFG, optim=OptimConfig(lr=1e-2, warmup_steps=1), prune=PruneConfig(method="magnitude"))
    cfg.train.steps = 3
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])  # one device: a quicker compile, the same arithmetic
    trainer = Trainer(cfg, mesh)
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
        after = np.asarray(_at(params, path))
        assert np.all(after[~np.asarray(keep.get_value())] == 0), path
        assert np.any(after != np.asarray(before.get_value())), path  # the kept weights did train
    with Checkpointer(tmp_path / "run", CheckpointConfig(async_save=False)) as ckpt:
        ckpt.save(3, state.params, state.opt_state, {}, cfg)
    resumed = Trainer(cfg, mesh)
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


STRUCTURED = PruneConfig(method="structured", ffn_hidden_dim=48, n_kv_heads=1)


def _zeroed_units(model, prune):
    """The dense model with the FFN channels and query heads that structured pruning drops zeroed in w2 and wo
    (chosen here from the NumPy scores), which must compute what the smaller model computes."""
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for layer in state["layers"].values():
        ffn, attention = layer["feed_forward"], layer["attention"]
        scores = sum(np.sum(np.square(np.asarray(ffn[w])), axis=a) for w, a in (("w1", 0), ("w3", 0), ("w2", 1)))
        ffn["w2"] = ffn["w2"].at[np.argsort(-scores, kind="stable")[prune.ffn_hidden_dim:]].set(0)
        n_rep = CFG.n_heads // CFG.n_kv_heads
        heads = (np.sum(np.square(np.asarray(attention["wq"])), axis=(0, 2))
                 + np.sum(np.square(np.asarray(attention["wo"])), axis=(1, 2)))
        groups = (np.sum(np.square(np.asarray(attention["wk"])), axis=(0, 2))
                  + np.sum(np.square(np.asarray(attention["wv"])), axis=(0, 2)) + heads.reshape(-1, n_rep).sum(1))
        dropped = np.argsort(-groups, kind="stable")[prune.n_kv_heads:]
        attention["wo"] = attention["wo"].at[(dropped[:, None] * n_rep + np.arange(n_rep)).ravel()].set(0)
    masked = Llama(CFG, rngs=nnx.Rngs(0))
    nnx.update(masked, state)
    return masked


@pytest.fixture(scope="module")
def structured(model):
    return prune_model(model, STRUCTURED)


def test_structured_pruning_shrinks_and_equals_the_zeroed_dense_model(model, structured):
    cfg = structured.cfg
    assert (cfg.hidden_dim, cfg.n_kv_heads, cfg.n_heads, cfg.head_dim) == (48, 1, 2, CFG.head_dim)
    assert not cfg.derived_head_dim and cfg.shape_differences(CFG) == ["n_heads: 2 vs 4", "n_kv_heads: 1 vs 2",
                                                                       "hidden_dim: 48 vs 176"]
    assert sum(x.size for x in jax.tree.leaves(nnx.state(structured))) == cfg.num_params() < CFG.num_params()
    np.testing.assert_allclose(np.asarray(forward(structured, TOKENS)),
                               np.asarray(forward(_zeroed_units(model, STRUCTURED), TOKENS)), rtol=1e-5, atol=1e-5)
    assert strongest(jnp.array([1.0, 3.0, 2.0, 3.0]), 2).tolist() == [1, 3]


def test_head_dim_is_derived_unless_set():
    assert LlamaConfig(dim=64, n_heads=4).head_dim == 16
    assert LlamaConfig(dim=64, n_heads=2, head_dim=16).num_params() < LlamaConfig(dim=64, n_heads=2).num_params()
    with pytest.raises(ConfigError, match=r"model.dim \(64\) must be divisible by model.n_heads \(3\), or set "
                                          "model.head_dim"):
        LlamaConfig(dim=64, n_heads=3)
    with pytest.raises(ConfigError, match="head_dim = 15 must be even for RoPE"):
        LlamaConfig(dim=64, n_heads=3, head_dim=15)


@pytest.mark.parametrize("fmt", ["orbax", pytest.param("meta", marks=pytest.mark.torch_ref), "hf"])
def test_structured_checkpoint_round_trips(structured, tmp_path, fmt):
    loaded = load_pretrained(save_pretrained(structured, tmp_path / fmt, format=fmt))
    assert loaded.cfg.shape_differences(structured.cfg) == []  # Meta encodes the FFN width in multiple_of
    np.testing.assert_array_equal(np.asarray(forward(loaded, TOKENS)), np.asarray(forward(structured, TOKENS)))


def test_llama2c_keeps_ffn_pruning_and_refuses_pruned_heads(model, structured, tmp_path):
    ffn_only = prune_model(model, PruneConfig(method="structured", ffn_hidden_dim=48))
    loaded = load_pretrained(save_pretrained(ffn_only, tmp_path / "ffn", format="llama2c"))
    assert loaded.cfg.hidden_dim == 48
    np.testing.assert_allclose(np.asarray(forward(loaded, TOKENS)), np.asarray(forward(ffn_only, TOKENS)),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="llama2.c's header cannot describe head_dim 16"):
        save_pretrained(structured, tmp_path / "heads", format="llama2c")


@pytest.mark.torch_ref
def test_structured_hf_export_loads_in_transformers_with_our_logits(structured, tmp_path):
    from hf_reference import hf_logits
    from transformers import LlamaForCausalLM

    path = save_pretrained(structured, tmp_path / "hf", format="hf")
    hf = LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    assert (hf.config.intermediate_size, hf.config.num_attention_heads, hf.config.head_dim) == (48, 2, 16)
    np.testing.assert_allclose(hf_logits(hf, np.asarray(TOKENS)), np.asarray(forward(structured, TOKENS)),
                               rtol=1e-4, atol=1e-4)


def test_prune_cli_writes_the_pruned_checkpoint(model, tmp_path, capsys):
    src = save_pretrained(model, tmp_path / "dense", format="orbax")
    (tmp_path / "dense" / "tokenizer.model").write_bytes(b"spm")
    assert main(["prune", "--input", str(src), "--output", str(tmp_path / "out"), "prune.method=2:4"]) == 0
    assert "2:4 pruning; projection sparsity 0.0% -> 50.0%" in capsys.readouterr().out
    assert projection_sparsity(nnx.state(load_pretrained(tmp_path / "out"), nnx.Param)) == 0.5
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == b"spm"
    assert main(["prune", "--input", str(src), "--output", str(tmp_path / "bad"), "prune.method=structured"]) == 2
    assert capsys.readouterr().err.strip() == ("error: prune.method=structured needs prune.ffn_hidden_dim and/or "
                                               "prune.n_kv_heads (the widths to keep)")


@pytest.mark.e2e
def test_recovery_fine_tune_lowers_bits_per_byte_and_keeps_the_mask(play_txt, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    import prune_example
    text = tmp_path / "play.txt"  # a third of the corpus: ~10 KB held out, quicker to prepare and evaluate
    text.write_text(play_txt.read_text()[:200_000])
    variants = ("2:4", "FFN 50% + 1 of 2 KV groups")
    dense, results = prune_example.run(text, tmp_path, pretrain_steps=20, recovery_steps=8, variants=variants)
    summary = prune_example.report(dense, results)
    for pruned, recovered in results.values():
        assert pruned.bits_per_byte > dense.bits_per_byte, summary
        assert recovered.bits_per_byte < pruned.bits_per_byte - 0.01, summary
    assert results["2:4"][0].sparsity == results["2:4"][1].sparsity == 0.5, summary  # the mask held through training
    assert results[variants[1]][1].params < dense.params, summary
