"""One attention entry point with interchangeable implementations: XLA einsum, cuDNN flash (GPU), splash (TPU).

`attention(q, k, v, visibility, implementation)` takes queries `[B, T, N, H]` and keys/values `[B, S, K, H]`
(grouped-query: kv head j serves query heads j*r .. (j+1)*r-1) and returns `[B, T, N, H]`. What a query may see is
always causal by slot (key slot s is visible to the query at slot `q_start + t` when s <= q_start + t), and further
restricted by `Visibility.segment_ids` (`[B, T]`, packed sequences: a query sees only keys of its own segment) and
by an explicit `Visibility.mask` (`[B, T, S]`, True = may attend; left padding of a KV cache).

- `xla`: scores materialised as `[B, K, R, T, S]` float32, then softmax; the reference, runs anywhere. On CPU,
  cache-less causal self-attention runs it in query chunks (`causal_chunks`).
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, a fused flash kernel (bf16/fp16 only).
- `splash`: the Pallas splash-attention kernel for TPU (interpreted on CPU, for tests; refused on GPU), sharded with
  `shard_map` over the mesh's batch and head axes.
- `auto`: cudnn on GPU, splash on TPU, xla otherwise.

The kernels serve causal self-attention (training, evaluation, scoring, and a prefill into an empty KV cache:
`q_start == 0`, `T == S`, no `mask`); anything else (prefill behind earlier cache entries, decoding) runs the XLA
path, as do shapes a kernel cannot take (float32, or head dims past 128 or not a multiple of 8, for cuDNN;
sequences that are not a multiple of 128 for splash) under `auto`. Decoding reads the whole cache either way, so a
flash kernel buys nothing there. `cached_attention` is the XLA path's form for attending to a cache
before this step's keys/values are written into it (the model uses it for one-token float32 steps on CPU).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from llama_jax.config import ATTENTION as IMPLEMENTATIONS, ConfigError
from llama_jax.einsum import einsum
from llama_jax.sharding import active_spec, current_platform, shard_map_logical

CUDNN_PLATFORMS = ("gpu", "cuda")
AUTO = {**dict.fromkeys(CUDNN_PLATFORMS, "cudnn"), "tpu": "splash"}
# `causal_chunks`: how many chunks, of at least how many query rows for float32 and for 16-bit compute (measured in
# bf16, whose products run in XLA:CPU's bf16 kernels, so the products a chunk skips save less than its copies cost),
# and more chunks where one would pass CPU_CHUNK_ROWS_MAX rows.
CPU_CHUNKS, CPU_CHUNK_ROWS_FLOAT32, CPU_CHUNK_ROWS_16BIT, CPU_CHUNK_ROWS_MAX = 4, 64, 128, 512
CUDNN_MAX_HEAD_DIM = 128  # cuDNN flash attention's limit before Hopper (256 from it on); LLaMA 2's heads are 128
SPLASH_BLOCK = 512  # largest splash tile; must divide the sequence (kernel tiles are multiples of 128)
Q_NAMES = ("batch", "seq", "heads", "head_dim")
KV_NAMES = ("batch", "seq", "kv_heads", "head_dim")


@dataclass(frozen=True)
class Visibility:
    """What each query may attend to besides causality: its slot offset, its segment, an explicit mask."""

    q_start: jax.Array | int = 0
    segment_ids: jax.Array | None = None
    mask: jax.Array | None = None

    def dense(self, t: int, s: int) -> jax.Array:
        """`[B or 1, T, S]` booleans: which key slot each query may attend to."""
        allowed = (jnp.arange(s)[None, :] <= (self.q_start + jnp.arange(t))[:, None])[None]
        if self.segment_ids is not None:
            allowed = allowed & (self.segment_ids[:, :, None] == self.segment_ids[:, None, :])
        return allowed if self.mask is None else allowed & self.mask

    def is_self_attention(self, t: int, s: int) -> bool:
        """Cache-less causal self-attention (what the kernels implement), known at trace time."""
        return isinstance(self.q_start, int) and self.q_start == 0 and t == s and self.mask is None


def _scores(spec: str, grouped: jax.Array, keys: jax.Array, allowed: jax.Array) -> jax.Array:
    """Float32 scores `[B, K, R, T, S]` of grouped queries `[B, T, K, R, H]` against `keys` (laid out as `spec`
    says), scaled by 1/sqrt(H); where `allowed` (`[B or 1, T, S]`) is False, the float32 minimum."""
    scores = jnp.einsum(spec, grouped, keys, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(grouped.shape[-1]))
    return jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)


@jax.custom_vjp
def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """The reference: exact softmax over float32 scores of every (query, key) pair.

    Differentiated as flash attention's backward pass is: the softmax gradient takes the row sums of
    `d_out * out` (`[B, T, N]`) instead of autodiff's `probs * d_probs` over every score (`[B, K, R, T, S]`), and
    hidden scores, whose probabilities are zero, need no mask. On a 24M-parameter CPU train step at sequence 256
    this cut attention's backward by a third.
    """
    return _xla_attention_fwd(q, k, v, allowed)[0]


def _xla_attention_fwd(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array
                       ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    grouped = q.reshape(b, t, kv_heads, n // kv_heads, h)
    probs = jax.nn.softmax(_scores("BTKRH,BSKH->BKRTS", grouped, k, allowed), axis=-1)
    # A plain einsum, not `llama_jax.einsum`: reading a KV cache written in the same step, XLA:CPU rearranged a
    # float32-result product after choosing its bf16 kernel, and its fallback cannot multiply bf16 into float32.
    out = jnp.einsum("BKRTS,BSKH->BTKRH", probs.astype(q.dtype), v).reshape(b, t, n, h)
    return out, (q, k, v, probs, out)


def _xla_attention_bwd(residuals: tuple[jax.Array, ...], d_out: jax.Array) -> tuple[jax.Array | None, ...]:
    q, k, v, probs, out = residuals
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    grouped = (b, t, kv_heads, n // kv_heads, h)
    # Only training runs this (no KV cache), so every product below can go to XLA:CPU's bf16 kernels (`einsum`).
    d_out = d_out.astype(q.dtype)
    d_probs = jnp.einsum("BTKRH,BSKH->BKRTS", d_out.reshape(grouped), v, preferred_element_type=jnp.float32)
    row = jnp.einsum("BTNH,BTNH->BTN", d_out, out, preferred_element_type=jnp.float32)
    row = row.reshape(b, t, kv_heads, n // kv_heads).transpose(0, 2, 3, 1)[..., None]  # [B, K, R, T, 1]
    d_scores = (probs * (d_probs - row) / jnp.sqrt(jnp.float32(h))).astype(q.dtype)
    d_q = einsum("BKRTS,BSKH->BTKRH", d_scores, k).reshape(q.shape)
    d_k = einsum("BKRTS,BTKRH->BSKH", d_scores, q.reshape(grouped))
    d_v = einsum("BKRTS,BTKRH->BSKH", probs.astype(q.dtype), d_out.reshape(grouped))
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


xla_attention.defvjp(_xla_attention_fwd, _xla_attention_bwd)


def causal_chunks(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """`xla_attention` of causal self-attention (`T == S`) as chunks of query rows, each attending only to the keys
    up to its last row: the keys after it are hidden from every row of the chunk, so the result is the same.

    A chunk of `T / n` rows skips `(n - 1) / 2n` of the score products and softmax (3/8 with 4 chunks), and its
    `[B, K, R, T / n, S']` scores are smaller than one `[B, K, R, T, S]` array. On the 2-core AMD EPYC, forward and
    backward of 8 x 256 tokens with 8 heads of 64 took 50-58 ms instead of 82-102; of 2 x 1024, 162-165 instead of
    295-321 (8 chunks of 128 rows). 64 rows per chunk was fastest at 256 tokens (2 chunks: 64-70 ms, 8: 61-64; at
    1024 tokens 4 and 8 chunks were as fast, 16: 200 ms), so float32 takes chunks of at least 64 rows. In the whole
    train step with two gradient chains, fewer chunks won: float32 at 4 x 512 tokens 1.05x faster in 4 chunks than 8
    (level at 2 x 1024), so at most 4; bf16 at 8 x 256 tokens in 2 chunks rather than 4 (the README demo's 5,950 ->
    6,516 tokens/s, the bench config's 1,706 -> 1,782) and at 1024 in 4 rather than 8 (+8%), so 16-bit compute takes
    up to 4 chunks of at least 128 rows. Past 2048 tokens chunks keep to 512 rows: at 2 x 4096 tokens 8 chunks ran
    1.19x (float32) and 1.22x (bf16) faster than 4, and 16 chunks 0.86x and 1.01x of 8; at 2048, 8 and 4 were level.
    """
    t = q.shape[1]
    rows = CPU_CHUNK_ROWS_FLOAT32 if q.dtype == jnp.float32 else CPU_CHUNK_ROWS_16BIT
    n = max(min(CPU_CHUNKS, t // rows), t // CPU_CHUNK_ROWS_MAX)
    if n < 2:
        return xla_attention(q, k, v, allowed)
    bounds = [t * i // n for i in range(n + 1)]
    return jnp.concatenate([xla_attention(q[:, a:b], k[:, :b], v[:, :b], allowed[:, a:b, :b])
                            for a, b in zip(bounds, bounds[1:])], axis=1)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                     visibility: Visibility, index: jax.Array | int) -> jax.Array:
    """`T` new queries `[B, T, N, H]` attending to a KV cache's slots before `index` (`[B, K, S, H]`, read before
    this step writes it) and to the `T` new keys/values `[B, T, K, H]` that the caller writes at `index ..
    index+T-1`: the same attention as over the updated cache, without reading the write."""
    b, t, n, h = q.shape
    kv_heads, s = k_cache.shape[1], k_cache.shape[2]
    grouped = q.reshape(b, t, kv_heads, n // kv_heads, h)
    allowed = visibility.dense(t, s)
    scores = jnp.concatenate([
        _scores("BTKRH,BKSH->BKRTS", grouped, k_cache, allowed & (jnp.arange(s) < index)),
        _scores("BTKRH,BUKH->BKRTU", grouped, k, jax.lax.dynamic_slice_in_dim(allowed, index, t, axis=2))], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    # Heads first, as the products give them, and the small result transposed after: asked for `[B, T, K, R, H]`,
    # XLA:CPU multiplied the transposed values by the probabilities, copying each layer's value cache into that
    # layout on every step (2.5 ms of an 18 ms stories110m step at batch 1 on a 2-core AMD EPYC).
    out = (jnp.einsum("BKRTS,BKSH->BKRTH", probs[..., :s], v_cache)
           + jnp.einsum("BKRTU,BUKH->BKRTH", probs[..., s:], v))
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """cuDNN flash attention, causal; segments become a boolean mask that cuDNN folds into its bias."""
    mask = None if segment_ids is None else (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
                     interpret: bool) -> jax.Array:
    """Causal splash attention per device: batch over (data, fsdp), heads over tensor, like every activation.

    When the tensor axis splits the query heads but not the fewer kv heads, keys/values are repeated up to one per
    query head first, so each device holds the kv heads its query heads need.
    """
    n, kv_heads = q.shape[2], k.shape[2]
    if kv_heads != n and not _same_head_split(q.shape, k.shape):
        k, v = jnp.repeat(k, n // kv_heads, axis=2), jnp.repeat(v, n // kv_heads, axis=2)
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)  # the kernel does not scale
    kernel_fn = functools.partial(_splash_local, interpret=interpret)
    if segment_ids is None:
        return shard_map_logical(kernel_fn, (q, k, v), (Q_NAMES, KV_NAMES, KV_NAMES), Q_NAMES)
    return shard_map_logical(kernel_fn, (q, k, v, segment_ids), (Q_NAMES, KV_NAMES, KV_NAMES, ("batch", "seq")),
                             Q_NAMES)


def _same_head_split(q_shape: tuple[int, ...], k_shape: tuple[int, ...]) -> bool:
    q_spec, k_spec = active_spec(Q_NAMES, q_shape), active_spec(KV_NAMES, k_shape)
    return q_spec is None or q_spec[2] == k_spec[2]


def _splash_local(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None, *,
                  interpret: bool) -> jax.Array:
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, t, n, h = q.shape
    block = min(SPLASH_BLOCK, t)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = splash.make_splash_mha(splash.MultiHeadMask([splash.CausalMask((t, t))] * n), block_sizes=sizes,
                                    head_shards=1, q_seq_shards=1, interpret=interpret)

    def one_row(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array | None) -> jax.Array:
        ids = None if seg is None else splash.SegmentIds(seg, seg)
        heads_first = (1, 0, 2)
        return kernel(q.transpose(heads_first), k.transpose(heads_first), v.transpose(heads_first),
                      segment_ids=ids).transpose(heads_first)

    if segment_ids is None:
        return jax.vmap(lambda q, k, v: one_row(q, k, v, None))(q, k, v)
    return jax.vmap(one_row)(q, k, v, segment_ids)


def resolve(implementation: str, platform: str) -> str:
    """The implementation a setting names on `platform` (`auto`: cudnn on GPU, splash on TPU, else xla)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention '{implementation}' is not one of {IMPLEMENTATIONS}")
    return AUTO.get(platform, "xla") if implementation == "auto" else implementation


def choose(implementation: str, q: jax.Array, kernel_ok: bool, strict: bool = True) -> str:
    """The implementation that will run: `auto` resolved for the platform, kernels only where they apply.

    An explicit kernel that cannot take this call (the cache path) runs the XLA reference; one that cannot take the
    shape or dtype raises when `strict`, so a requested kernel is never silently skipped in training. A prefill
    (`strict=False`) must run whatever its prompt's length, so it takes the reference there, as `auto` does.
    """
    platform = current_platform()
    name = resolve(implementation, platform)
    if name == "xla" or not kernel_ok:
        return "xla"
    problem = _kernel_problem(name, platform, q.dtype, q.shape[-1], q.shape[1])
    if problem is None:
        return name
    if implementation == "auto" or not strict:
        return "xla"
    raise ValueError(_unusable(name, problem))


def check_setting(implementation: str, platform: str, dtype: jnp.dtype | str, head_dim: int) -> None:
    """Raise before any data is prepared or anything compiled when `implementation` names a kernel that cannot
    train this model on `platform` at all (JAX's own error for cuDNN on a CPU was a long traceback at the first
    step); a sequence length a kernel cannot take is found where the shapes are known (`choose`)."""
    name = resolve(implementation, platform)
    if implementation == "auto" or name == "xla":  # `auto` takes the reference wherever a kernel cannot run
        return
    problem = _kernel_problem(name, platform, jnp.dtype(dtype), head_dim)
    if problem is not None:
        raise ConfigError(_unusable(name, problem))


def _unusable(name: str, problem: str) -> str:
    return f"attention='{name}' {problem}; use attention=auto or xla"


def _kernel_problem(name: str, platform: str, dtype: jnp.dtype, head_dim: int, seq_len: int | None = None
                    ) -> str | None:
    if name == "cudnn" and platform not in CUDNN_PLATFORMS:
        return f"needs an NVIDIA GPU (cuDNN), but this program runs on {platform}"
    if name == "cudnn" and dtype not in (jnp.bfloat16, jnp.float16):
        return f"needs bfloat16 or float16 compute, got {dtype}; set dtype=bfloat16"
    if name == "cudnn" and (head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM):
        return f"needs a head dim that is a multiple of 8 up to {CUDNN_MAX_HEAD_DIM}, got {head_dim}"
    if name == "splash" and platform in CUDNN_PLATFORMS:  # a TPU recipe run on a GPU
        return f"is the TPU kernel: on {platform} Pallas would interpret it, far slower than cudnn"
    if name == "splash" and seq_len is not None and seq_len % 128:
        return f"needs a sequence length that is a multiple of 128, got {seq_len}"
    return None


def attention(q: jax.Array, k: jax.Array, v: jax.Array, visibility: Visibility = Visibility(),
              implementation: str = "auto", strict: bool = True) -> jax.Array:
    """Causal grouped-query attention `[B, T, N, H]` x `[B, S, K, H]` -> `[B, T, N, H]` (see the module doc;
    `strict`: see `choose`)."""
    t, s = q.shape[1], k.shape[1]
    name = choose(implementation, q, visibility.is_self_attention(t, s), strict)
    if name == "cudnn":
        return cudnn_attention(q, k, v, visibility.segment_ids)
    if name == "splash":
        return splash_attention(q, k, v, visibility.segment_ids, interpret=current_platform() != "tpu")
    if current_platform() == "cpu" and visibility.is_self_attention(t, s):
        return causal_chunks(q, k, v, visibility.dense(t, s))
    return xla_attention(q, k, v, visibility.dense(t, s))

