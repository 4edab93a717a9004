"""Every attention implementation against an independent float64 NumPy reference: GQA, padding masks, segment ids."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax import KVCache, Llama, LlamaConfig
from llama_jax.attention import (Visibility, _kernel_problem, attention, causal_chunks, check_setting, choose,
                                 xla_attention)
from llama_jax.config import Config, ConfigError, ExecutionConfig, MeshConfig
from llama_jax.sharding import make_mesh
from llama_jax.training.step import Trainer

B, T, N, K, H = 2, 128, 4, 2, 16
TOL = {"float32": 1e-5, "bfloat16": 2e-2}


def numpy_attention(q, k, v, allowed):
    """softmax(q k^T / sqrt(H)) v in float64, kv head j serving query heads j*r .. (j+1)*r-1."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(np.asarray(allowed)[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", probs, v)


def numpy_allowed(t, s, q_start=0, segment_ids=None, mask=None):
    allowed = np.broadcast_to(np.arange(s)[None, :] <= q_start + np.arange(t)[:, None], (B, t, s))
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return allowed if mask is None else allowed & mask


def _qkv(dtype, t=T, s=T, n=N, k=K, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape), dtype) for shape in ((B, t, n, H), (B, s, k, H), (B, s, k, H)))


SEGMENTS = np.stack([np.repeat([0, 1, 2], [40, 50, 38]), np.repeat([0, 1], [100, 28])]).astype(np.int32)


def _assert_close(out, ref, dtype):
    assert out.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("impl", ["xla", "splash"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("segments", [False, True], ids=["causal", "segments"])
def test_self_attention_matches_numpy(impl, dtype, segments):
    q, k, v = _qkv(dtype)
    seg = SEGMENTS if segments else None
    out = jax.jit(lambda q, k, v: attention(q, k, v, Visibility(0, seg), impl))(q, k, v)
    _assert_close(out, numpy_attention(q, k, v, numpy_allowed(T, T, segment_ids=seg)), dtype)


@pytest.mark.parametrize("t, chunks", [(128, 2), (200, 3), (512, 4)])
def test_cpu_query_chunks_match_one_piece_with_gradients(t, chunks):
    """Causal chunks of query rows (uneven at 200) give the single-piece values and gradients, GQA and segment ids
    included, and CPU self-attention runs them: no score array as large as the whole `[B, K, R, T, S]` is left."""
    q, k, v = _qkv("float32", t=t, s=t, seed=2)
    seg = jnp.asarray(np.stack([np.repeat([0, 1], [t // 3, t - t // 3]), np.zeros(t, int)]), jnp.int32)
    allowed = Visibility(0, seg).dense(t, t)

    def grads(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, allowed))), argnums=(0, 1, 2)))

    for g, r in zip(grads(causal_chunks)(q, k, v), grads(xla_attention)(q, k, v)):  # keys' sums over the chunks
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5, rtol=1e-6)
    out = jax.jit(causal_chunks)(q, k, v, allowed)
    _assert_close(out, numpy_attention(q, k, v, numpy_allowed(t, t, segment_ids=np.asarray(seg))), "float32")
    hlo = jax.jit(lambda q, k, v: attention(q, k, v, Visibility(0, seg))).lower(q, k, v).compile().as_text()
    _assert_chunk_scores(hlo, t, chunks)


@pytest.mark.parametrize("t, chunks", [(128, 1), (256, 2), (512, 4), (1024, 4), (4096, 8)])
def test_cpu_bf16_chunks_are_fewer_and_match_numpy(t, chunks):
    """16-bit compute takes up to 4 chunks of at least 128 query rows (float32's are of 64), and more where a chunk
    would pass 512 rows; same values as NumPy."""
    q, k, v = _qkv("bfloat16", t=t, s=t, seed=3)
    seg = np.stack([np.repeat([0, 1], [t // 3, t - t // 3]), np.zeros(t, int)]).astype(np.int32)
    fn = jax.jit(lambda q, k, v: attention(q, k, v, Visibility(0, jnp.asarray(seg)), "xla"))
    _assert_close(fn(q, k, v), numpy_attention(q, k, v, numpy_allowed(t, t, segment_ids=seg)), "bfloat16")
    _assert_chunk_scores(fn.lower(q, k, v).compile().as_text(), t, chunks)


def _assert_chunk_scores(hlo: str, t: int, chunks: int) -> None:
    """The compiled program holds each chunk's `[B, K, R, rows, keys up to its last row]` float32 scores and, when
    there are several chunks, no whole `[B, K, R, T, T]` array."""
    bounds = [t * i // chunks for i in range(chunks + 1)]
    assert chunks == 1 or f"f32[{B},{K},{N // K},{t},{t}]" not in hlo
    assert all(f"f32[{B},{K},{N // K},{end - start},{end}]" in hlo for start, end in zip(bounds, bounds[1:]))


def test_cache_path_with_left_padding_matches_numpy():
    """Queries at slots 5..12 of a 32-slot cache, row 1 left-padded by 3 slots (the decode/prefill path)."""
    q, k, v = _qkv("float32", t=8, s=32)
    pad = np.array([0, 3])
    mask = np.broadcast_to((np.arange(32)[None, :] >= pad[:, None])[:, None], (B, 8, 32))
    for impl in ("auto", "xla", "splash", "cudnn"):  # kernels hand the cache path to XLA
        out = attention(q, k, v, Visibility(jnp.int32(5), None, jnp.asarray(mask)), impl)
        _assert_close(out, numpy_attention(q, k, v, numpy_allowed(8, 32, 5, mask=mask)), "float32")


def test_splash_gradients_match_xla():
    q, k, v = _qkv("float32", seed=1)

    def loss(impl):
        return lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, Visibility(0, SEGMENTS), impl)))

    got = jax.jit(jax.grad(loss("splash"), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.jit(jax.grad(loss("xla"), argnums=(0, 1, 2)))(q, k, v)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kv_heads", [4, 1], ids=["kv-split", "kv-repeated"])
def test_splash_under_a_mesh_matches_numpy(kv_heads):
    """shard_map over batch (fsdp 2) and heads (tensor 4): with one kv head, kv is repeated per query head."""
    q, k, v = _qkv("float32", k=kv_heads)
    mesh = make_mesh(MeshConfig(1, 2, 4))
    with jax.set_mesh(mesh):
        out = jax.jit(lambda q, k, v: attention(q, k, v, Visibility(0, SEGMENTS), "splash"))(q, k, v)
    _assert_close(out, numpy_attention(q, k, v, numpy_allowed(T, T, segment_ids=SEGMENTS)), "float32")


def test_choose_resolves_auto_and_rejects_what_a_kernel_cannot_take():
    q32, q16 = jnp.zeros((1, 128, 4, 16)), jnp.zeros((1, 100, 4, 16), jnp.bfloat16)
    assert choose("auto", q32, True) == "xla"  # on CPU
    assert choose("splash", q32, False) == "xla"  # the cache path
    with pytest.raises(ValueError, match="needs an NVIDIA GPU .cuDNN., but this program runs on cpu"):
        choose("cudnn", jnp.zeros((1, 128, 4, 16), jnp.bfloat16), True)
    with pytest.raises(ValueError, match="multiple of 128"):
        choose("splash", q16, True)
    assert choose("cudnn", jnp.zeros((1, 16, 4, 20), jnp.bfloat16), True, strict=False) == "xla"  # a prefill
    assert _kernel_problem("cudnn", "gpu", jnp.bfloat16, 128, 100) is None
    assert "needs bfloat16 or float16" in _kernel_problem("cudnn", "gpu", jnp.float32, 128)
    assert "head dim that is a multiple of 8" in _kernel_problem("cudnn", "cuda", jnp.float16, 20)
    assert "head dim that is a multiple of 8" in _kernel_problem("cudnn", "gpu", jnp.bfloat16, 256)
    with pytest.raises(ValueError, match="not one of"):
        choose("flash", q32, True)


def test_a_kernel_that_cannot_train_the_model_here_is_refused_before_anything_runs():
    check_setting("auto", "cpu", "float32", 64)
    check_setting("xla", "gpu", "float32", 256)
    check_setting("cudnn", "gpu", "bfloat16", 128)
    check_setting("splash", "tpu", "float32", 256)  # splash's sequence limit is checked per call
    with pytest.raises(ConfigError, match="attention='cudnn' needs an NVIDIA GPU .cuDNN., but this program runs on"):
        check_setting("cudnn", "cpu", "bfloat16", 64)
    with pytest.raises(ConfigError, match="needs bfloat16 or float16 compute, got float32"):
        check_setting("cudnn", "gpu", "float32", 64)
    with pytest.raises(ConfigError, match="attention='splash' is the TPU kernel: on gpu Pallas would interpret it"):
        check_setting("splash", "gpu", "bfloat16", 128)  # the TPU recipes name splash
    check_setting("splash", "cpu", "float32", 16)  # interpret mode on CPU is how its tests run it
    execution = ExecutionConfig(attention="cudnn", dtype="bfloat16")
    with pytest.raises(ConfigError, match="needs an NVIDIA GPU"):  # before any data or step
        Trainer(Config(model=LlamaConfig.preset("tiny"), execution=execution), make_mesh(MeshConfig()))


def test_packed_rows_equal_their_segments_run_alone():
    """A row packing two sequences (segment ids + restarting positions) gives each the logits it gets alone, also
    as a prefill that fills a KV cache from slot 0."""
    cfg = LlamaConfig.preset("tiny", n_layers=2)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    first, second = rng.integers(0, cfg.vocab_size, 50), rng.integers(0, cfg.vocab_size, 78)
    tokens = jnp.asarray(np.concatenate([first, second])[None], jnp.int32)
    segment_ids = jnp.asarray(np.repeat([0, 1], [50, 78])[None], jnp.int32)
    positions = jnp.asarray(np.concatenate([np.arange(50), np.arange(78)])[None], jnp.int32)
    packed = jax.jit(lambda t, p, s: model(t, positions=p, segment_ids=s))(tokens, positions, segment_ids)
    alone = jax.jit(lambda t: model(t))
    np.testing.assert_allclose(np.asarray(packed[0, :50]), np.asarray(alone(jnp.asarray(first[None])))[0], atol=1e-4)
    np.testing.assert_allclose(np.asarray(packed[0, 50:]), np.asarray(alone(jnp.asarray(second[None])))[0], atol=1e-4)
    cache = KVCache.create(cfg, batch=1, slots=160)
    prefilled, cache = jax.jit(lambda t, p, s, c: model(t, positions=p, segment_ids=s, cache=c))(
        tokens, positions, segment_ids, cache)
    np.testing.assert_allclose(np.asarray(prefilled), np.asarray(packed), atol=1e-5)
    assert int(cache.index) == 128 and not np.asarray(cache.k[0][:, :, 128:]).any()
    with pytest.raises(ValueError, match="takes no mask"):
        model(tokens[:, :4], mask=jnp.ones((1, 4, 8), bool), segment_ids=segment_ids[:, :4],
              cache=KVCache.create(cfg, batch=1, slots=8))
