"""Generation: token-for-token parity with transformers, cache-vs-full-forward logits, EOS, context, compilation."""

import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_reference import make_hf_model, save_hf_model
from random_checkpoint import save_random_checkpoint

import llama_jax
from llama_jax import KVCache, Llama, generate
from llama_jax.config import ExecutionConfig, LlamaConfig, MeshConfig
from llama_jax.inference import generate as gen
from llama_jax.inference.sampling import Sampling
from llama_jax.sharding import make_mesh, sharded_init

PROMPTS = [[1, 17, 42, 99, 5], [1, 7], [1, 88, 3, 64, 120, 33, 9, 71, 12, 100, 4], [1, 50, 51]]
NEW = 32


def hf_greedy(hf, prompts, new_tokens, pad_id=0):
    """transformers greedy generate with left padding + attention_mask; returns new ids per row up to EOS."""
    import torch

    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=attn, do_sample=False, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, pad_token_id=pad_id, eos_token_id=None)
    return out[:, width:].tolist()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Random transformers models (MHA with 4 kv heads, GQA with 2), each with its saved directory."""
    models = {kv: make_hf_model(kv_heads=kv) for kv in (4, 2)}
    return {kv: (hf, save_hf_model(hf, tmp_path_factory.mktemp(f"hf{kv}"))) for kv, hf in models.items()}


@pytest.fixture(params=[4, 2], ids=["mha", "gqa"])
def hf_pair(request, hf_dirs):
    hf, path = hf_dirs[request.param]
    return hf, llama_jax.load_pretrained(path)


@pytest.mark.torch_ref
def test_greedy_matches_transformers_token_for_token(hf_pair):
    hf, model = hf_pair
    assert generate(model, PROMPTS, max_new_tokens=NEW) == hf_greedy(hf, PROMPTS, NEW)


@pytest.mark.torch_ref
def test_stops_each_row_at_eos_and_includes_it(hf_pair):
    _, model = hf_pair
    free = generate(model, PROMPTS, max_new_tokens=NEW)
    eos = free[0][5]
    stopped = generate(model, PROMPTS, max_new_tokens=NEW, eos_id=eos)
    for row, got in zip(free, stopped):
        expected = row[:row.index(eos) + 1] if eos in row else row
        assert got == expected
    assert len(stopped[0]) <= 6


@pytest.mark.torch_ref
def test_prefill_then_decode_logits_equal_full_forward(hf_pair):
    _, model = hf_pair
    steps = 6
    rng = np.random.default_rng(0)
    rows = [list(rng.integers(0, 128, n)) for n in (3, 9, 6)]
    continuation = rng.integers(0, 128, (len(rows), steps))
    width = max(map(len, rows))
    tokens, pad = gen.left_pad(rows, width)
    logits, cache = nnx.jit(gen.prefill_padded, static_argnums=3)(model, jnp.asarray(tokens), jnp.asarray(pad),
                                                                   width + steps)
    forward = nnx.jit(gen.forward_padded)
    got = [logits]
    for i in range(steps - 1):
        logits, cache = forward(model, jnp.asarray(continuation[:, i:i + 1]), jnp.asarray(pad), cache)
        got.append(logits[:, 0])
    got = np.stack(got, axis=1)
    full_forward = nnx.jit(lambda m, t: m(t))
    for b, row in enumerate(rows):
        full = full_forward(model, jnp.asarray([row + list(continuation[b, :steps - 1])]))[0]
        want = np.asarray(full[len(row) - 1:])
        np.testing.assert_allclose(got[b], want, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random GQA model with a 40-token context."""
    cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, ffn_hidden_dim=172, max_seq_len=40)
    return llama_jax.load_pretrained(save_random_checkpoint(cfg, tmp_path_factory.mktemp("tiny")))


def test_decode_loop_compiles_once_per_bucket(tiny):
    loop_before, prefill_before = gen.decode_loop_jit._cache_size(), gen.prefill_jit._cache_size()
    a = generate(tiny, [[1, 2, 3]], max_new_tokens=9)
    b = generate(tiny, [[1, 2, 3, 4, 5, 6, 7], [4, 5]], max_new_tokens=13, temperature=0.0)
    generate(tiny, [[9, 8, 7, 6, 5], [1, 2]], max_new_tokens=16)
    # Batch 1 and batch 2; prompt lengths 3..7 and 9..16 new tokens share buckets.
    assert gen.decode_loop_jit._cache_size() - loop_before == 2
    assert gen.prefill_jit._cache_size() - prefill_before == 2
    assert len(a[0]) == 9 and [len(r) for r in b] == [13, 13]

    step_before = gen.step_jit._cache_size()
    seen = []
    streamed = generate(tiny, [[1, 2, 3], [5]], max_new_tokens=12, stream=lambda t: seen.append(t.tolist()))
    assert gen.step_jit._cache_size() - step_before == 1  # one compile for all 11 steps
    assert [list(col) for col in zip(*seen)] == streamed
    assert streamed == generate(tiny, [[1, 2, 3], [5]], max_new_tokens=12)


def test_samples_of_one_prompt_prefill_it_once(tiny, monkeypatch):
    """Eight rows of three prompts (best-of-K's shape) prefill four rows (the three, padded to a power of two) and
    decode what each prompt decodes alone; a batch of four distinct prompts among eight shares that compile."""
    a, b, c = [1, 17, 42, 99, 5], [1, 7], [1, 88, 3, 64, 120, 33]
    rows = [a, b, a, a, b, c, a, a]
    prefilled, prefill = [], gen.prefill_jit

    def counting(graphdef, params, tokens, *args, **kwargs):
        prefilled.append(tokens.shape[0])
        return prefill(graphdef, params, tokens, *args, **kwargs)

    monkeypatch.setattr(gen, "prefill_jit", counting)
    state = gen.decode(tiny, rows, 12, Sampling())
    alone = {tuple(p): gen.decode(tiny, [p], 12, Sampling()) for p in (a, b, c)}
    assert prefilled == [4, 1, 1, 1]
    for row, prompt in enumerate(rows):
        single = alone[tuple(prompt)]
        np.testing.assert_array_equal(np.asarray(state.out[row]), np.asarray(single.out[0]))
        np.testing.assert_allclose(np.asarray(state.logp[row]), np.asarray(single.logp[0]), atol=1e-5, rtol=0)
    compiled = prefill._cache_size()
    gen.decode(tiny, [a, b, c, [1, 2, 3], a, b, c, a], 12, Sampling())
    assert prefilled[-1] == 4 and prefill._cache_size() == compiled

    sampled = np.asarray(gen.decode(tiny, [a] * 4, 12, Sampling(1.0), seed=3).out)
    assert prefilled[-1] == 1 and len({tuple(r) for r in sampled.tolist()}) == 4  # four draws, not one copied


def test_context_bounds(tiny):
    assert len(generate(tiny, [list(range(1, 36))], max_new_tokens=50)[0]) == 5  # 35 + 5 = max_seq_len 40
    with pytest.raises(ValueError, match="prompt 1 has 40 tokens but the model's context is 40"):
        generate(tiny, [[1], list(range(40))], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(tiny, [[1]], max_new_tokens=0)


def test_sampling_is_seeded(tiny):
    kwargs = dict(max_new_tokens=16, temperature=1.0, top_p=0.95, top_k=40)
    first = generate(tiny, [[1, 2], [3]], seed=7, **kwargs)
    assert generate(tiny, [[1, 2], [3]], seed=7, **kwargs) == first
    assert generate(tiny, [[1, 2], [3]], seed=8, **kwargs) != first


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("mesh_config", [MeshConfig(data=1, fsdp=8, tensor=1), MeshConfig(data=2, fsdp=2, tensor=2)])
def test_one_row_decodes_the_same_on_a_sharded_mesh(mesh_config, tied):
    """At batch 1 a float32 projection multiplies the halves of its weight's input axis (`llama_jax.einsum`), and a
    tied table its `[dim, vocab]` copy (`Llama.decode_head`); with those axes sharded, the single-device tokens."""
    cfg = LlamaConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=64,
                      tie_embeddings=tied)
    sharded = sharded_init(lambda: Llama(cfg, ExecutionConfig(), rngs=nnx.Rngs(0)), make_mesh(mesh_config))
    single = Llama(cfg, ExecutionConfig(), rngs=nnx.Rngs(1))
    nnx.update(single, jax.device_put(nnx.state(sharded), jax.devices()[0]))
    assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(nnx.state(sharded)))
    assert generate(sharded, [[1, 2, 3, 4, 5]], max_new_tokens=12) == generate(single, [[1, 2, 3, 4, 5]],
                                                                                max_new_tokens=12)


def test_repeated_prompts_decode_the_same_on_a_sharded_mesh():
    """The rows copied from each distinct prompt's prefill follow the batch sharding: on a (2, 2, 2) mesh, the
    single-device tokens of each prompt alone."""
    cfg = LlamaConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=64)
    sharded = sharded_init(lambda: Llama(cfg, ExecutionConfig(), rngs=nnx.Rngs(0)),
                           make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    single = Llama(cfg, ExecutionConfig(), rngs=nnx.Rngs(1))
    nnx.update(single, jax.device_put(nnx.state(sharded), jax.devices()[0]))
    a, b = [1, 2, 3, 4, 5], [1, 9]
    want = {tuple(p): generate(single, [p], max_new_tokens=12)[0] for p in (a, b)}
    rows = [a, b, a, a, b, a, a, a]
    assert generate(sharded, rows, max_new_tokens=12) == [want[tuple(p)] for p in rows]


@pytest.mark.torch_ref
def test_sharded_generation_matches_and_cache_is_sharded(hf_dirs):
    hf, path = hf_dirs[2]
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    model = llama_jax.load_pretrained(path, mesh=mesh)
    assert generate(model, PROMPTS, max_new_tokens=8) == hf_greedy(hf, PROMPTS, 8)

    graphdef, params = nnx.split(model)
    tokens, pad = gen.left_pad(PROMPTS, 16)
    with jax.set_mesh(mesh):
        state = gen.prefill_jit(graphdef, params, tokens, pad, jax.random.key(0), jnp.int32(-1),
                                sampling=gen.Sampling(), slots=32, n_out=16)
    spec = state.cache.k[0].sharding.spec  # layer 0's [batch, kv_heads, slots, head_dim]
    assert spec[0] == ("data", "fsdp") and spec[1] == "tensor"


@pytest.mark.e2e
def test_bench_decode_runs_in_short_form():
    script = Path(__file__).resolve().parents[1] / "experiments" / "bench_decode.py"
    run = subprocess.run([sys.executable, str(script), "--models", "tiny", "--batch-sizes", "2", "--prompt-len", "8",
                          "--new-tokens", "4", "--repeats", "1", "--temperature", "1", "--top-p", "0.9"],
                         capture_output=True, text=True, env=dict(os.environ, XLA_FLAGS=""), timeout=300)
    assert run.returncode == 0, run.stderr
    assert "temperature=1.0, top_p=0.9" in run.stdout.splitlines()[0]
    row = run.stdout.strip().splitlines()[-1].split()
    assert row[:3] == ["tiny", "1.0M", "2"] and all(float(v.replace(",", "")) > 0 for v in row[3:])


@pytest.mark.parametrize("kv_heads,scan", [(2, False), (1, True)])
def test_bf16_generation_runs_batched_with_a_long_prompt(kv_heads, scan):
    """bf16 prefill into a KV cache and decoding from it, at shapes where XLA:CPU once had no kernel: with the forward
    `probs x values` asking for a float32 result, a batch-16 prefill of 128 tokens with 48-wide heads stopped with
    "Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32"."""
    cfg = LlamaConfig(dim=96, n_layers=2, n_heads=2, n_kv_heads=kv_heads, vocab_size=64, max_seq_len=160)
    execution = ExecutionConfig(dtype="bfloat16", param_dtype="bfloat16", scan_layers=scan)
    model = Llama(cfg, execution, rngs=nnx.Rngs(0))
    prompts = np.random.default_rng(0).integers(1, 64, (16, 128)).tolist()
    out = generate(model, prompts, max_new_tokens=4)
    assert len(out) == 16 and all(len(row) == 4 for row in out)


def test_float32_decode_step_writes_its_cache_without_copying_it():
    """Attending to the cache as it was plus the new token, and writing the slot after attention, leaves XLA:CPU no
    reason to copy a layer's cache: attending to the slot just written, it copied each layer's keys and values several
    times per step (3.4 ms of a 24.8 ms stories110m step at batch 1)."""
    cfg = LlamaConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=64)
    model = Llama(cfg, ExecutionConfig(), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens, pad = gen.left_pad([[1, 2, 3, 4]], 8)  # batch 1: where XLA:CPU made the copies
    eos = jnp.int32(gen.PAD)
    state = gen.prefill_jit(graphdef, params, tokens, pad, jax.random.key(0), eos, sampling=Sampling(), slots=24,
                            n_out=16)
    program = gen.decode_loop_jit.lower(graphdef, params, state, eos, jnp.int32(16), sampling=Sampling())
    layer_cache = state.cache.k[0].size
    copies = [shape for shape in re.findall(r"%copy[\w.-]* = f32\[([\d,]*)\]", program.compile().as_text())
              if math.prod(map(int, shape.split(","))) == layer_cache]
    # 8 before: two copies of each layer's keys and values; then 2: each layer's values transposed for the
    # probabilities x values product (asked for a [B, T, K, R, H] result).
    assert copies == []


def test_bf16_decoding_of_one_row_makes_no_float32_copy_of_the_weights():
    """One row's bf16 products run in the bf16 kernels (`llama_jax.einsum` pads the row to two): XLA:CPU multiplied
    a single bf16 row in float32 on converted copies of every weight, made on each call of the per-token step (what
    the server and streaming run: stories110m 122 ms/step instead of 25) and kept beside the weights for the whole
    decode loop (twice the bf16 weights' memory)."""
    cfg = LlamaConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1024, max_seq_len=64)
    model = Llama(cfg, ExecutionConfig(dtype="bfloat16", param_dtype="bfloat16"), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    weights = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    tokens, pad = gen.left_pad([[1, 2, 3, 4]], 8)
    eos = jnp.int32(gen.PAD)
    state = gen.prefill_jit(graphdef, params, tokens, pad, jax.random.key(0), eos, sampling=Sampling(), slots=24,
                            n_out=16)
    step = gen.step_jit.lower(graphdef, params, state, eos, sampling=Sampling()).compile()
    loop = gen.decode_loop_jit.lower(graphdef, params, state, eos, jnp.int32(16), sampling=Sampling()).compile()
    # Before: 7.3 MB and 8.4 MB of temporaries for these 4.2 MB of weights; now 20 kB and 1 MB (the embedding
    # table, which XLA converts before its gather and hoists out of the loop).
    assert step.memory_analysis().temp_size_in_bytes < weights / 8
    assert loop.memory_analysis().temp_size_in_bytes < weights / 2


def test_float32_decode_loop_transposes_a_tied_table_once():
    """Float32 decoding on CPU multiplies by a `[dim, vocab]` copy of a tied table (`Llama.decode_head`), made once
    before the loop (stories15m at batch 1: 2.01 -> 1.80 ms/step) or before the per-token steps of streaming and the
    server (`decode_head_jit`), and decodes what per-token steps over the stored table decode."""
    cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, vocab_size=256, max_seq_len=64, tie_embeddings=True)
    graphdef, params = nnx.split(Llama(cfg, ExecutionConfig(), rngs=nnx.Rngs(0)))
    tokens, pad = gen.left_pad([[1, 2, 3, 4], [1, 9]], 8)
    eos, sampling = jnp.int32(gen.PAD), Sampling()

    def prefill():
        return gen.prefill_jit(graphdef, params, tokens, pad, jax.random.key(0), eos, sampling=sampling, slots=24,
                               n_out=16)

    looped = gen.decode_loop_jit(graphdef, params, prefill(), eos, jnp.int32(16), sampling=sampling)
    head = gen.decode_head_jit(graphdef, params)
    assert head.shape == (64, 256)
    for step_head in (None, head):
        stepped = prefill()
        for _ in range(15):
            stepped = gen.step_jit(graphdef, params, stepped, eos, sampling=sampling, head=step_head)
        np.testing.assert_array_equal(np.asarray(looped.out), np.asarray(stepped.out))
        np.testing.assert_allclose(np.asarray(looped.logp), np.asarray(stepped.logp), atol=1e-5, rtol=0)

    text = gen.decode_loop_jit.lower(graphdef, params, prefill(), eos, jnp.int32(16),
                                     sampling=sampling).compile().as_text()
    computations, name = {}, None
    for line in text.splitlines():
        if line.endswith("{") and not line.startswith(" "):
            name = "entry" if line.startswith("ENTRY") else line.split()[0].lstrip("%")
        elif name is not None:
            computations.setdefault(name, []).append(line)
    bodies = set(re.findall(r"while\(.*body=%([\w.-]+)", text))
    table_copies = {name: sum(bool(re.search(r"= f32\[64,256\]\{1,0\} (fusion|copy)\(", line)) for line in lines)
                    for name, lines in computations.items() if name == "entry" or name in bodies}
    assert bodies and table_copies == {"entry": 1, **{body: 0 for body in bodies}}


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_one_token_steps_give_the_full_forward_logits(kv_heads):
    """Decoding one token at a time (attention to the cache as it was plus the new token) against one forward pass
    over each whole row, with left padding; no torch needed, so the Python 3.12 pass checks it too."""
    cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=kv_heads, vocab_size=128, max_seq_len=32)
    model = Llama(cfg, rngs=nnx.Rngs(1))
    rows = [[1, 5, 9], [1, 7, 3, 8, 2, 6]]
    steps = 5
    continuation = np.random.default_rng(0).integers(0, 128, (len(rows), steps))
    tokens, pad = gen.left_pad(rows, 6)
    logits, cache = nnx.jit(gen.prefill_padded, static_argnums=3)(model, jnp.asarray(tokens), jnp.asarray(pad),
                                                                   6 + steps)
    forward = nnx.jit(gen.forward_padded)
    got = [logits]
    for i in range(steps - 1):
        logits, cache = forward(model, jnp.asarray(continuation[:, i:i + 1]), jnp.asarray(pad), cache)
        got.append(logits[:, 0])
    got = np.stack(got, axis=1)
    for b, row in enumerate(rows):
        full = nnx.jit(lambda m, t: m(t))(model, jnp.asarray([row + list(continuation[b, :steps - 1])]))[0]
        np.testing.assert_allclose(got[b], np.asarray(full[len(row) - 1:]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prefill_attends_among_the_prompt_tokens_only(dtype):
    """`prefill_padded` (left padding as a segment of its own, no cache slots in attention, the head on the last
    position only) gives the next-token logits and the cache contents of a masked pass over the whole fresh cache,
    whose compiled scores spanned every slot and whose head projected every position."""
    cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=64)
    model = Llama(cfg, ExecutionConfig(dtype=dtype), rngs=nnx.Rngs(0))
    tokens, pad = (jnp.asarray(a) for a in gen.left_pad([[1, 5, 9], [1, 7, 3, 8, 2, 6, 4]], 8))
    slots = 24

    def masked(m: Llama, tokens: jax.Array, pad: jax.Array) -> tuple[jax.Array, KVCache]:
        return gen.forward_padded(m, tokens, pad, KVCache.create(cfg, 2, slots, jnp.dtype(dtype)))

    (logits, cache), (want_logits, want_cache) = (nnx.jit(gen.prefill_padded, static_argnums=3)(
        model, tokens, pad, slots), nnx.jit(masked)(model, tokens, pad))
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(np.asarray(logits, np.float32), np.asarray(want_logits[:, -1], np.float32),
                               atol=tol * 10, rtol=0)
    for b, first in enumerate(np.asarray(pad)):
        for got, want in zip((*cache.k, *cache.v), (*want_cache.k, *want_cache.v)):
            got, want = (np.asarray(KVCache((a,), (a,), 0).read(0)[0], np.float32) for a in (got, want))
            np.testing.assert_allclose(got[b, :, first:], want[b, :, first:], atol=tol, rtol=0)
            assert not got[b, :, 8:].any()
    assert int(cache.index) == int(want_cache.index) == 8

    graphdef, params = nnx.split(model)

    def compiled(fn: Callable[..., Any]) -> str:
        return jax.jit(lambda p, t, q: fn(nnx.merge(graphdef, p), t, q)).lower(params, tokens, pad).compile().as_text()
    new, old = compiled(lambda m, t, q: gen.prefill_padded(m, t, q, slots)), compiled(masked)
    assert set(re.findall(r"f32\[2,2,2,8,(\d+)\]", new)) == {"8"}
    assert set(re.findall(r"f32\[2,2,2,8,(\d+)\]", old)) == {str(slots)}
    assert "f32[2,8,128]" in old and "f32[2,8,128]" not in new


def test_prefill_runs_a_named_kernel_where_it_applies():
    """A prefill takes the configured kernel (splash here, in interpret mode) when the prompt bucket suits it, and
    the XLA reference when it does not, where training with that shape would stop."""
    cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=256)
    reference = Llama(cfg, rngs=nnx.Rngs(0))
    splash = Llama(cfg, ExecutionConfig(attention="splash"), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for width in (128, 16):
        tokens, pad = (jnp.asarray(a) for a in gen.left_pad([list(rng.integers(1, 128, width - 5)),
                                                             list(rng.integers(1, 128, width))], width))
        text = jax.jit(lambda t, p: gen.prefill_padded(splash, t, p, width + 8)[0]).lower(tokens, pad).as_text()
        assert ("splash" in text) == (width == 128)
        (got, got_cache), (want, want_cache) = (gen.prefill_padded(m, tokens, pad, width + 8)
                                                for m in (splash, reference))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=0)
        np.testing.assert_allclose(np.asarray(got_cache.k[1])[:, :, 5:], np.asarray(want_cache.k[1])[:, :, 5:],
                                   atol=1e-4, rtol=0)
