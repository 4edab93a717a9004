"""`convert` / `resize-vocab` CLI and the orbax format: lossless round trips, sharded restore, errors."""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_reference import hf_logits, make_hf_model, save_hf_model

import llama_jax
from llama_jax.checkpoints import detect_format
from llama_jax.checkpoints.resize import resize_vocab
from llama_jax.cli import main
from llama_jax.config import MeshConfig
from llama_jax.sharding import make_mesh

TOKENS = np.random.RandomState(3).randint(0, 128, (2, 19)).astype(np.int32)
pytestmark = pytest.mark.torch_ref


def _params(model):
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.e2e
def test_cli_round_trip_orbax_hf_meta_llama2c_orbax_is_lossless(tmp_path):
    hf = make_hf_model(kv_heads=2)
    model = llama_jax.load_pretrained(save_hf_model(hf, tmp_path / "src"))
    llama_jax.save_pretrained(model, tmp_path / "orbax", format="orbax")
    chain = [("orbax", "hf", []), ("hf", "meta", ["--num-shards", "2"]), ("meta", "llama2c", []),
             ("llama2c", "orbax2", [])]
    for src, dst, extra in chain:
        fmt = dst.rstrip("2")
        assert main(["convert", "--input", str(tmp_path / src), "--output", str(tmp_path / dst), "--format", fmt,
                     *extra]) == 0
        assert detect_format(tmp_path / dst) == fmt
    final = llama_jax.load_pretrained(tmp_path / "orbax2")
    original = _params(model)
    assert final.cfg.hidden_dim == 172 and set(_params(final)) == set(original)
    for name, value in _params(final).items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)
    np.testing.assert_allclose(np.asarray(final(jnp.asarray(TOKENS))), hf_logits(hf, TOKENS), atol=1e-4, rtol=0)


def test_orbax_restores_directly_sharded_and_in_bf16(tmp_path):
    hf = make_hf_model(kv_heads=2)
    model = llama_jax.load_pretrained(save_hf_model(hf, tmp_path / "src"))
    llama_jax.save_pretrained(model, tmp_path / "orbax", format="orbax")
    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
    sharded = llama_jax.load_pretrained(tmp_path / "orbax", mesh=mesh)
    wq = sharded.layers[0].attention.wq.get_value()
    assert wq.sharding.mesh.shape == mesh.shape and len(wq.sharding.device_set) == 8
    assert wq.sharding.shard_shape(wq.shape) != wq.shape
    with jax.set_mesh(mesh):
        logits = sharded(jnp.asarray(TOKENS))
    np.testing.assert_allclose(np.asarray(logits), hf_logits(hf, TOKENS), atol=1e-4, rtol=0)
    half = llama_jax.load_pretrained(tmp_path / "orbax", dtype="bfloat16")
    assert half.layers[1].feed_forward.w2.get_value().dtype == jnp.bfloat16
    scanned = llama_jax.load_pretrained(tmp_path / "orbax", scan_layers=True)
    stacked = np.asarray(scanned.layers.feed_forward.w1.get_value())
    for i in range(2):
        np.testing.assert_array_equal(stacked[i], np.asarray(model.layers[i].feed_forward.w1.get_value()))


def test_convert_refuses_non_empty_output_and_unknown_input(tmp_path, capsys):
    llama_jax.save_pretrained(llama_jax.load_pretrained(save_hf_model(make_hf_model(), tmp_path / "src")),
                              tmp_path / "orbax", format="orbax")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    args = ["convert", "--input", str(tmp_path / "orbax"), "--output", str(tmp_path / "out"), "--format", "hf"]
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "out" / "keep.txt").read_text() == "precious"
    assert main(args + ["--overwrite"]) == 0 and detect_format(tmp_path / "out") == "hf"
    assert main(["convert", "--input", str(tmp_path / "out" / "keep.txt"), "--output", str(tmp_path / "x"),
                 "--format", "hf"]) == 2
    assert "not a known checkpoint layout" in capsys.readouterr().err


def test_resize_vocab_keeps_old_logits(tokenizer_1k, tmp_path):
    hf = make_hf_model()
    save_hf_model(hf, tmp_path / "src")
    assert main(["resize-vocab", "--checkpoint", str(tmp_path / "src"), "--tokenizer", str(tokenizer_1k),
                 "--output", str(tmp_path / "big")]) == 0
    big = llama_jax.load_pretrained(tmp_path / "big")
    assert detect_format(tmp_path / "big") == "hf" and big.cfg.vocab_size == 1000
    logits = np.asarray(big(jnp.asarray(TOKENS)))
    np.testing.assert_allclose(logits[..., :128], hf_logits(hf, TOKENS), atol=1e-4, rtol=0)
    emb = hf.model.embed_tokens.weight.detach().numpy()
    new_rows = np.asarray(big.tok_embeddings.get_value())[128:]
    np.testing.assert_allclose(new_rows, np.broadcast_to(emb.mean(0), (872, 64)), atol=1e-6)
    with pytest.raises(ValueError, match="smaller than the model's 1000"):
        resize_vocab(big, 999)


@pytest.mark.e2e
def test_bench_convert_runs_in_tiny_form(tmp_path):
    script = Path(__file__).resolve().parents[1] / "experiments" / "bench_convert.py"
    args = ["--dim", "64", "--layers", "2", "--vocab", "256", "--shards", "2", "--formats", "hf",
            "--workdir", str(tmp_path)]
    run = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "peak RSS" in run.stdout and (tmp_path / "out-hf" / "config.json").is_file()
