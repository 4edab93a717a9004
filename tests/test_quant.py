"""Weight-only quantization: NumPy-exact quantizer, logits and bits per byte near float, exact checkpoint round trip,
quantized generation, and QLoRA (adapters trained over a frozen int8 base)."""

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax import lora, quant
from llama_jax.checkpoints import load_pretrained, save_pretrained
from llama_jax.checkpoints.orbax_format import read_stored
from llama_jax.cli import main
from llama_jax.config import Config, ConfigError, ExecutionConfig, LlamaConfig, LoraConfig
from llama_jax.inference.generate import generate
from llama_jax.inference.text import generate_text
from llama_jax.model import Llama
from llama_jax.sharding import make_mesh
from llama_jax.training.step import Trainer

CFG = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=64)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 16)), jnp.int32)
forward = nnx.jit(lambda model, tokens: model(tokens))
# RMS logit error over the logits' standard deviation, measured on CFG's random init (seeds 0-2, logits std 1.0):
# int8 0.012, int4 in groups of 16 0.165 (random Gaussian weights; a trained model's error is smaller, see README).
RELATIVE_RMS_TOLERANCE = {"int8": 0.02, "int4": 0.25}


def numpy_quantize(w: np.ndarray, lead: int, in_dims: int, bits: int, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference: symmetric absmax quantization of the flattened input in groups (the whole input for int8);
    scale = absmax / qmax, q = round-half-even(w / scale) in [-qmax, qmax]; returns (q, scales, dequantized)."""
    n_in = math.prod(w.shape[lead:lead + in_dims])
    x = w.reshape(*w.shape[:lead], n_in, -1)
    g = n_in if bits == 8 else min(group, n_in)
    x = x.reshape(*x.shape[:-2], n_in // g, g, x.shape[-1])
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(x).max(axis=-2, keepdims=True) / np.float32(qmax)
    scale = np.where(scale == 0, np.float32(1), scale)
    q = np.clip(np.round(x / scale), -qmax, qmax)
    return q.reshape(w.shape), scale[..., 0, :], (q * scale).reshape(w.shape)


@pytest.mark.parametrize("bits,group,shape,axes,in_dims", [
    (8, 128, (64, 4, 16), ("embed", "heads", "head_dim"), 1),       # wq
    (4, 16, (64, 4, 16), ("embed", "heads", "head_dim"), 1),
    (8, 128, (4, 16, 64), ("heads", "head_dim", "embed"), 2),       # wo
    (4, 64, (4, 16, 64), ("heads", "head_dim", "embed"), 2),        # a group of 64 spans 4 heads of 16
    (4, 32, (3, 128, 96), ("layers", "embed", "mlp"), 1),           # stacked w1
])
def test_dequantized_weights_equal_numpy_reference(bits, group, shape, axes, in_dims):
    w = np.random.default_rng(bits + group).standard_normal(shape).astype(np.float32)
    w[..., 0] = 0.0  # an all-zero channel takes scale 1
    q = quant.quantize_weight(nnx.Param(jnp.asarray(w), axes=axes), in_dims, f"int{bits}", group)
    lead = 1 if axes[0] == "layers" else 0
    ref_q, ref_scale, ref_w = numpy_quantize(w, lead, in_dims, bits, group)
    assert q.qvalue.dtype == jnp.dtype(f"int{bits}") and q.qvalue.get_metadata()["axes"] == axes
    np.testing.assert_array_equal(np.asarray(q.qvalue[...], np.int32), ref_q)
    np.testing.assert_array_equal(np.asarray(q.scale[...]).reshape(ref_scale.shape), ref_scale)
    np.testing.assert_array_equal(np.asarray(q.dequantize(jnp.float32)), ref_w)


def test_group_size_that_splits_no_input_is_one_line_error():
    with pytest.raises(ConfigError, match="quant_group_size 40 does not split the 64 input features of wq"):
        nnx.eval_shape(lambda: Llama(CFG, ExecutionConfig(quant="int4", quant_group_size=40), rngs=nnx.Rngs(0)))
    with pytest.raises(ConfigError, match="execution.quant 'int3' is not one of"):
        ExecutionConfig(quant="int3")


def test_quantized_logits_near_float_and_equal_to_dequantized_weights():
    model = Llama(CFG, rngs=nnx.Rngs(0))
    reference = forward(model, TOKENS)
    for mode, group in ("int8", 128), ("int4", 16):
        quantized = quant.quantize_model(nnx.clone(model), mode, group)
        logits = forward(quantized, TOKENS)
        relative_rms = float(jnp.sqrt(jnp.mean((logits - reference) ** 2)) / jnp.std(reference))
        assert 0 < relative_rms < RELATIVE_RMS_TOLERANCE[mode], (mode, relative_rms)
    # The matmul path reads exactly the dequantized weights: the float model holding them gives the same logits.
    np.testing.assert_array_equal(np.asarray(forward(quant.dequantized(quantized), TOKENS)), np.asarray(logits))


def _assert_same_params(a, b) -> None:
    before, after = nnx.state(a, nnx.Param), nnx.state(b, nnx.Param)
    assert jax.tree.structure(before) == jax.tree.structure(after)
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


@pytest.mark.parametrize("mode,group,scan", [("int8", 128, False), ("int4", 16, True)])
def test_quantized_orbax_checkpoint_round_trips_exactly(tmp_path, mode, group, scan):
    model = Llama(CFG, ExecutionConfig(scan_layers=scan, quant=mode, quant_group_size=group), rngs=nnx.Rngs(0))
    save_pretrained(model, tmp_path / "q", "orbax")
    stored = read_stored(tmp_path / "q")
    assert (stored.quant, stored.quant_group_size) == (mode, group)
    again = load_pretrained(tmp_path / "q", scan_layers=scan)  # quantized as stored
    assert again.execution.quant == mode
    assert jnp.dtype(mode) in {x.dtype for x in jax.tree.leaves(nnx.state(again, quant.QuantizedParam))}
    _assert_same_params(model, again)
    # quant="none" dequantizes on load; the other formats are written dequantized.
    _assert_same_params(load_pretrained(tmp_path / "q", quant="none", scan_layers=scan), quant.dequantized(model))


def test_generate_quantized_matches_its_dequantized_float_model(tmp_path):
    model = quant.quantize_model(Llama(CFG, rngs=nnx.Rngs(0)), "int8")
    prompts = [[1, 5, 9, 3], [1, 7]]
    tokens = generate(model, prompts, max_new_tokens=8)
    assert tokens == generate(quant.dequantized(model), prompts, max_new_tokens=8)
    assert all(len(t) == 8 for t in tokens)


@pytest.mark.e2e
def test_generate_cli_quant_flag(tmp_path, capsys):
    from tiny_lm import make_tiny_lm
    hf, tok_path, _, tok = make_tiny_lm(tmp_path, max_seq_len=64)
    assert main(["generate", "--checkpoint", str(hf), "--tokenizer", str(tok_path), "--prompt", "The cat",
                 "--max-new-tokens", "6", "--quant", "int8"]) == 0
    expected = generate_text(load_pretrained(hf, quant="int8"), tok, ["The cat"], 6)[0]
    assert capsys.readouterr().out == "The cat" + expected + "\n"


QLORA_CFG = dataclasses.replace(CFG, n_layers=1)  # one layer: half the train step's compile time


def _qlora_trainer(mode: str) -> tuple[Trainer, Config]:
    cfg = Config(model=QLORA_CFG, lora=LoraConfig(rank=4, alpha=8.0, targets=[".*"]))
    cfg.execution = ExecutionConfig(quant=mode, quant_group_size=16)
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.train.steps = 1e-2, 0, 20
    return Trainer(cfg, make_mesh(cfg.mesh)), cfg


@pytest.mark.e2e
def test_qlora_trains_adapters_only_over_a_frozen_int8_base():
    trainer, cfg = _qlora_trainer("int8")
    state = trainer.abstract_state()
    assert {type(v) for _, v in nnx.to_flat_state(state.params)} == {lora.LoRAParam}
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * sum(x.size for x in jax.tree.leaves(state.params))
    assert jnp.dtype("int8") in {x.dtype for x in jax.tree.leaves(trainer.abstract_frozen())}

    base = quant.quantize_model(Llama(QLORA_CFG, rngs=nnx.Rngs(0)), "int8")
    frozen_before = [np.asarray(x) for x in jax.tree.leaves(nnx.state(base, quant.QuantizedParam))]
    train_state = trainer.init_state(base)
    rows = jnp.asarray(np.tile(np.arange(17) % 11 + 3, (4, 1)), jnp.int32)  # a pattern to memorise
    losses = []
    for _ in range(8):
        train_state, metrics = trainer.train_step(train_state, {"tokens": rows})
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses
    trained = trainer.model(train_state.params)
    frozen_after = jax.tree.leaves(nnx.state(trained, quant.QuantizedParam))
    assert all(a.dtype == b.dtype and np.array_equal(a, np.asarray(b)) for a, b in zip(frozen_before, frozen_after))

    # Merging folds the adapters into the dequantized base: the float model gives the adapted logits.
    adapted = forward(trained, TOKENS)
    merged = lora.merge(trained)
    assert merged.execution.quant == "none" and not nnx.state(merged, quant.QuantizedParam)
    np.testing.assert_allclose(np.asarray(forward(merged, TOKENS)), np.asarray(adapted), rtol=1e-5, atol=1e-5)


def test_quantized_full_training_is_refused():
    cfg = Config(model=CFG)
    cfg.execution = ExecutionConfig(quant="int8")
    with pytest.raises(ConfigError, match="QLoRA: lora.rank > 0"):
        Trainer(cfg, make_mesh(cfg.mesh))


def test_llama2c_version2_export_is_runq_q8_0(tmp_path):
    """The file `runq` memory-maps: 256-byte header, float32 norms, then per tensor int8 values and one float32
    scale per group, each group quantized as llama2.c's exporter does (scale = absmax / 127)."""
    from llama_jax.checkpoints.layout import iter_meta_tensors
    model = Llama(CFG, rngs=nnx.Rngs(0))
    save_pretrained(model, tmp_path / "q80", "llama2c", version=2, group_size=32)
    data = (tmp_path / "q80" / "model.bin").read_bytes()
    ints = np.frombuffer(data[:37], np.uint8)
    assert np.frombuffer(data[:8], np.int32).tolist() == [0x616B3432, 2]
    assert np.frombuffer(data[8:36], np.int32).tolist() == [64, CFG.hidden_dim, 2, 4, 2, 128, 64]
    assert ints[36] == 0 and np.frombuffer(data[37:41], np.int32)[0] == 32 and not any(data[41:256])
    tensors = dict(iter_meta_tensors(model))
    pos = 256
    norms = [f"layers.{i}.{k}.weight" for k in ("attention_norm", "ffn_norm") for i in range(2)] + ["norm.weight"]
    for name in norms:
        np.testing.assert_array_equal(np.frombuffer(data[pos:pos + 4 * 64], np.float32), tensors[name])
        pos += 4 * 64
    kinds = ["attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
             "feed_forward.w3"]
    names = ["tok_embeddings.weight", *[f"layers.{i}.{k}.weight" for k in kinds for i in range(2)], "output.weight"]
    for name in names:
        groups = tensors[name].reshape(-1, 32)
        scale = np.abs(groups).max(axis=1) / np.float32(127)
        q = np.frombuffer(data[pos:pos + groups.size], np.int8).reshape(groups.shape)
        pos += groups.size
        np.testing.assert_array_equal(q, np.round(groups / scale[:, None]))
        np.testing.assert_array_equal(np.frombuffer(data[pos:pos + 4 * len(scale)], np.float32), scale)
        pos += 4 * len(scale)
    assert pos == len(data)


@pytest.mark.e2e
def test_bench_quant_runs_in_short_form(tfds_dir):
    script = Path(__file__).resolve().parents[1] / "experiments" / "bench_quant.py"
    run = subprocess.run([sys.executable, str(script), "--data-dir", str(tfds_dir), "--train-steps", "4",
                          "--eval-batches", "1", "--big-preset", "tiny", "--group-size", "32", "--new-tokens", "3",
                          "--prompt-len", "4"], capture_output=True, text=True,
                         env=dict(os.environ, XLA_FLAGS=""), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    tiny = [line.split() for line in lines if line.startswith("tiny_shakespeare")]  # model quant MiB bpb delta tok/s
    big = [line.split()[2:] for line in lines if line.startswith("tiny x1L")]       # quant MiB tok/s
    assert [r[1] for r in tiny] == [r[0] for r in big] == ["none", "int8", "int4"], run.stdout
    assert float(tiny[0][2]) > float(tiny[1][2]) > float(tiny[2][2])  # parameter memory shrinks
    assert abs(float(tiny[1][4])) < 0.01  # int8 moves bits per byte by less than 0.01
    assert all(float(r[-1].replace(",", "")) > 0 for r in tiny + big)
