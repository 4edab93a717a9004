"""llama2.c v0 export, checked by an independent numpy reader written from the format's spec."""

import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
from hf_reference import hf_logits, make_hf_model, save_hf_model
from meta_reference import meta_state_dict

import llama_jax
from llama_jax.checkpoints import detect_format

pytestmark = pytest.mark.torch_ref

KINDS = ["attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo", "ffn_norm",
         "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]


def read_run_c_checkpoint(file):
    """What run.c's memory_map_weights sees: header, then float32 sections in file order."""
    raw = np.fromfile(file, np.uint8)
    dim, hidden, layers, heads, kv_heads, vocab, seq = raw[:28].view(np.int32).tolist()
    floats = raw[28:].view(np.float32)
    hd, kv = dim // heads, dim // heads * kv_heads
    shapes = [("tok_embeddings.weight", (abs(vocab), dim))]
    per_kind = {"attention_norm": (dim,), "attention.wq": (dim, dim), "attention.wk": (kv, dim),
                "attention.wv": (kv, dim), "attention.wo": (dim, dim), "ffn_norm": (dim,),
                "feed_forward.w1": (hidden, dim), "feed_forward.w2": (dim, hidden), "feed_forward.w3": (hidden, dim)}
    for kind in KINDS:
        shapes += [(f"layers.{i}.{kind}.weight", per_kind[kind]) for i in range(layers)]
    shapes += [("norm.weight", (dim,)), ("freq_cis_real", (seq, hd // 2)), ("freq_cis_imag", (seq, hd // 2))]
    if vocab < 0:
        shapes.append(("output.weight", (-vocab, dim)))
    out, pos = {}, 0
    for name, shape in shapes:
        size = int(np.prod(shape))
        out[name] = floats[pos:pos + size].reshape(shape)
        pos += size
    assert pos == floats.size, "trailing bytes"
    return (dim, hidden, layers, heads, kv_heads, vocab, seq), out


@pytest.mark.parametrize("kv_heads,tie", [(4, False), (2, False), (2, True)])
def test_model_bin_holds_meta_layout_weights(kv_heads, tie, tmp_path):
    hf = make_hf_model(kv_heads=kv_heads, tie=tie)
    model = llama_jax.load_pretrained(save_hf_model(hf, tmp_path / "hf"), max_seq_len=64)
    out = llama_jax.save_pretrained(model, tmp_path / "l2c", format="llama2c")
    header, tensors = read_run_c_checkpoint(out / "model.bin")
    assert header == (64, 172, 2, 4, kv_heads, 128 if tie else -128, 64)
    expected = {k: v.numpy() for k, v in meta_state_dict(hf).items()}
    assert set(tensors) - {"freq_cis_real", "freq_cis_imag"} == set(expected)
    for name, tensor in expected.items():
        np.testing.assert_array_equal(tensors[name], tensor, err_msg=name)
    angles = np.arange(64)[:, None] * 10000.0 ** (-np.arange(0, 16, 2) / 16)
    np.testing.assert_allclose(tensors["freq_cis_real"], np.cos(angles), atol=1e-6)
    np.testing.assert_allclose(tensors["freq_cis_imag"], np.sin(angles), atol=1e-6)

    assert detect_format(out) == "llama2c" and detect_format(out / "model.bin") == "llama2c"
    reloaded = llama_jax.load_pretrained(out / "model.bin")
    tokens = np.random.RandomState(0).randint(0, 128, (1, 20)).astype(np.int32)
    np.testing.assert_allclose(np.asarray(reloaded(jnp.asarray(tokens))), hf_logits(hf, tokens), atol=1e-4, rtol=0)


def test_tokenizer_bin_parses(tokenizer_1k, tmp_path):
    model = llama_jax.load_pretrained(save_hf_model(make_hf_model(), tmp_path / "hf"))
    out = llama_jax.save_pretrained(model, tmp_path / "l2c", format="llama2c", tokenizer=tokenizer_1k)
    raw = (out / "tokenizer.bin").read_bytes()
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_1k))
    max_len, pos, pieces = int(np.frombuffer(raw[:4], np.uint32)[0]), 4, []
    while pos < len(raw):
        score = float(np.frombuffer(raw[pos:pos + 4], np.float32)[0])
        length = int(np.frombuffer(raw[pos + 4:pos + 8], np.int32)[0])
        pieces.append((score, raw[pos + 8:pos + 8 + length].decode("utf-8")))
        pos += 8 + length
    assert len(pieces) == sp.get_piece_size() == 1000
    assert max_len == max(len(p.encode()) for _, p in pieces)
    for i, (score, piece) in enumerate(pieces):
        assert piece == sp.id_to_piece(i).replace("\u2581", " ") and score == pytest.approx(sp.get_score(i))
    assert any(p.startswith(" ") for _, p in pieces)
