"""Our model against transformers' LlamaForCausalLM (torch, float32, eager attention) on random weights."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import hf_logits, make_hf_model, save_hf_model

import llama_jax

pytestmark = pytest.mark.torch_ref

CASES = [
    dict(vocab=128, dim=64, ffn=172, layers=2, heads=4, kv_heads=4),
    dict(vocab=128, dim=64, ffn=172, layers=2, heads=4, kv_heads=2),
    dict(vocab=257, dim=96, ffn=200, layers=3, heads=6, kv_heads=1),
    dict(vocab=300, dim=128, ffn=352, layers=1, heads=8, kv_heads=4, tie=True),
]


def _tokens(vocab: int, shape=(2, 33), seed: int = 1) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"v{c['vocab']}d{c['dim']}h{c['heads']}kv{c['kv_heads']}")
def test_logits_match_transformers_and_export_roundtrips(case, tmp_path):
    from transformers import LlamaForCausalLM

    hf = make_hf_model(**case)
    model = llama_jax.load_pretrained(save_hf_model(hf, tmp_path / "hf"))
    tokens = _tokens(case["vocab"])
    ref = hf_logits(hf, tokens)
    ours = model(jnp.asarray(tokens))
    assert ours.dtype == jnp.float32 and ours.shape == ref.shape
    assert np.abs(ref).max() > 1.0  # large logits, so the comparison means something
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)

    exported = llama_jax.save_pretrained(model, tmp_path / "export", format="hf")
    reloaded = LlamaForCausalLM.from_pretrained(exported, attn_implementation="eager").eval()
    np.testing.assert_allclose(hf_logits(reloaded, tokens), ref, atol=1e-5, rtol=0)


def test_sharded_safetensors_with_index(tmp_path):
    hf = make_hf_model(kv_heads=2)
    path = save_hf_model(hf, tmp_path / "hf", max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    tokens = _tokens(128)
    np.testing.assert_allclose(np.asarray(llama_jax.load_pretrained(path)(jnp.asarray(tokens))),
                               hf_logits(hf, tokens), atol=1e-4, rtol=0)


def test_generation_with_loaded_weights_tracks_reference_past_20_tokens(tmp_path):
    """A RoPE layout bug shows up only after ~20 positions: compare every position of a 96-token sequence."""
    hf = make_hf_model(kv_heads=2, layers=2)
    model = llama_jax.load_pretrained(save_hf_model(hf, tmp_path / "hf"))
    tokens = _tokens(128, shape=(1, 96), seed=3)
    ours = np.asarray(model(jnp.asarray(tokens)))
    ref = hf_logits(hf, tokens)
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_dtype_and_overrides_on_load(tmp_path):
    path = save_hf_model(make_hf_model(), tmp_path / "hf")
    model = llama_jax.load_pretrained(path, dtype="bfloat16", scan_layers=True)
    assert model.execution.param_dtype == "bfloat16" and model.execution.scan_layers
    assert model.tok_embeddings[...].dtype == jnp.bfloat16
    assert model(jnp.zeros((1, 4), jnp.int32)).dtype == jnp.float32


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        llama_jax.load_pretrained(tmp_path / "nope")


def test_non_llama_config_is_rejected(tmp_path):
    path = save_hf_model(make_hf_model(), tmp_path / "hf")
    raw = json.loads((path / "config.json").read_text())
    raw["model_type"] = "mistral"
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="not 'llama'"):
        llama_jax.load_pretrained(path)


def test_shape_mismatch_names_the_tensor(tmp_path):
    path = save_hf_model(make_hf_model(), tmp_path / "hf")
    raw = json.loads((path / "config.json").read_text())
    raw["vocab_size"] = 130
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="lm_head.weight"):
        llama_jax.load_pretrained(path)


def test_missing_tensor_names_it(tmp_path):
    from safetensors.torch import load_file, save_file
    path = save_hf_model(make_hf_model(), tmp_path / "hf")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        llama_jax.load_pretrained(path)


def test_save_refuses_non_empty_directory(tmp_path):
    model = llama_jax.load_pretrained(save_hf_model(make_hf_model(), tmp_path / "hf"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty"):
        llama_jax.save_pretrained(model, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"
