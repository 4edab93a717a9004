"""Meta checkpoints (params.json + consolidated.NN.pth): parity with transformers, round trips, errors."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import hf_logits, make_hf_model
from meta_reference import write_meta_checkpoint
from random_checkpoint import save_random_checkpoint

import llama_jax
from llama_jax.checkpoints import detect_format
from llama_jax.checkpoints.convert import convert
from llama_jax.config import LlamaConfig

TOKENS = np.random.RandomState(1).randint(0, 128, (2, 17)).astype(np.int32)
pytestmark = pytest.mark.torch_ref


def _load_shards(path):
    import torch

    return [torch.load(f, weights_only=True) for f in sorted(path.glob("consolidated.*.pth"))]


@pytest.mark.parametrize("kv_heads,num_shards", [(4, 2), (2, 2), (4, 4), (2, 1)])
def test_sharded_meta_checkpoint_matches_transformers_and_round_trips(kv_heads, num_shards, tmp_path):
    import torch

    hf = make_hf_model(kv_heads=kv_heads)
    src = write_meta_checkpoint(hf, tmp_path / "meta", num_shards, vocab_from_tokenizer=num_shards == 2)
    assert detect_format(src) == "meta"
    model = llama_jax.load_pretrained(src)
    assert model.cfg.vocab_size == 128 and model.cfg.hidden_dim == 172 and model.cfg.n_kv_heads == kv_heads
    ref = hf_logits(hf, TOKENS)
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(TOKENS))), ref, atol=1e-4, rtol=0)

    out = llama_jax.save_pretrained(model, tmp_path / "out", format="meta", num_shards=num_shards)
    original, written = _load_shards(src), _load_shards(out)
    assert len(written) == num_shards
    for orig, new in zip(original, written):
        assert set(new) == set(orig) - {"rope.freqs"}
        for name, tensor in new.items():
            assert tensor.dtype == torch.float32 and torch.equal(tensor, orig[name]), name


def test_bf16_checkpoint_converts_streaming_without_changing_bits(tmp_path):
    import torch

    src = write_meta_checkpoint(make_hf_model(kv_heads=4), tmp_path / "meta", 4, dtype=torch.bfloat16)
    out = convert(src, tmp_path / "out", "meta", num_shards=4)
    for orig, new in zip(_load_shards(src), _load_shards(out)):
        for name, tensor in new.items():
            assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, orig[name]), name
    model = llama_jax.load_pretrained(out, dtype="float32")
    ref = hf_logits(make_hf_model(kv_heads=4), TOKENS)
    assert np.abs(np.asarray(model(jnp.asarray(TOKENS))) - ref).max() < 0.1 * np.abs(ref).max()


def test_params_json_keeps_explicit_ffn_width_in_metas_own_keys(tmp_path):
    for ffn in (172, 100, 1000):
        cfg = LlamaConfig(dim=64, n_layers=1, n_heads=4, vocab_size=32, ffn_hidden_dim=ffn)
        out = save_random_checkpoint(cfg, tmp_path / str(ffn), format="meta")
        params = json.loads((out / "params.json").read_text())
        assert set(params) == {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                               "ffn_dim_multiplier", "norm_eps", "rope_theta"}
        hidden = int(2 * 4 * 64 / 3)  # Meta's FeedForward, written out independently
        if params["ffn_dim_multiplier"] is not None:
            hidden = int(params["ffn_dim_multiplier"] * hidden)
        assert params["multiple_of"] * ((hidden + params["multiple_of"] - 1) // params["multiple_of"]) == ffn
        assert llama_jax.load_pretrained(out).cfg.hidden_dim == ffn


def test_missing_shard_is_named(tmp_path):
    src = write_meta_checkpoint(make_hf_model(), tmp_path / "meta", 4)
    (src / "consolidated.01.pth").unlink()
    (src / "consolidated.03.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"consolidated\.01\.pth is missing"):
        llama_jax.load_pretrained(src)


def test_inconsistent_shard_shapes_name_tensor_and_file(tmp_path):
    import torch

    src = write_meta_checkpoint(make_hf_model(), tmp_path / "meta", 2)
    shard = torch.load(src / "consolidated.01.pth", weights_only=True)
    shard["layers.1.feed_forward.w2.weight"] = shard["layers.1.feed_forward.w2.weight"][:-1].clone()
    torch.save(shard, src / "consolidated.01.pth")
    with pytest.raises(ValueError, match=r"'layers\.1\.feed_forward\.w2\.weight': consolidated\.01\.pth"):
        llama_jax.load_pretrained(src)


def test_unknown_layout_and_bad_shard_count(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a known checkpoint layout"):
        llama_jax.load_pretrained(tmp_path / "junk")
    model = llama_jax.load_pretrained(write_meta_checkpoint(make_hf_model(kv_heads=2), tmp_path / "meta", 1))
    with pytest.raises(ValueError, match=r"num_shards=4: n_kv_heads=2"):
        llama_jax.save_pretrained(model, tmp_path / "out", format="meta", num_shards=4)
