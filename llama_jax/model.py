"""LLaMA 2 in Flax NNX, exactly as Meta's reference computes it.

Pre-norm decoder: `h = x + attn(attention_norm(x))`, `out = h + ffn(ffn_norm(h))`, RMSNorm in float32, RoPE on
adjacent pairs (Meta layout: weights are stored un-permuted), grouped-query attention with kv head j serving query
heads j*r .. (j+1)*r-1, SwiGLU, no biases. Parameters carry logical axis names (`axes` metadata) that
`llama_jax.sharding` maps onto the mesh. The model knows nothing of optimisers, files or meshes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from llama_jax.attention import Visibility, attention, cached_attention
from llama_jax.config import ExecutionConfig, LlamaConfig
from llama_jax.dropout import dropout
from llama_jax.einsum import einsum, operand_specs, unused_letter
from llama_jax.quant import QuantizedWeight, quantize_model
from llama_jax.rope import Rotation, computed_rotation, gathered_rotation, rope, table_rotation
from llama_jax.sharding import constrain, current_platform

# What the backward pass keeps of each layer's forward (the rest is recomputed). Named values: every projection's
# output ("projection": `linear` has its own gradient rule, which hides its dot from JAX's dot-based policies), the
# attention projections and attention's output ("context"), so saving them skips recomputing attention itself.
PROJECTION_NAME = "projection"
ATTENTION_NAMES = ("query_proj", "key_proj", "value_proj", "context", "out_proj")
_policies = jax.checkpoint_policies
REMAT = {
    "full": _policies.nothing_saveable,
    "save_dots": _policies.save_only_these_names(PROJECTION_NAME),
    "save_qkv": _policies.save_only_these_names(*ATTENTION_NAMES[:3]),
    "save_attention": _policies.save_only_these_names(*ATTENTION_NAMES),
    "offload_attention": _policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=list(ATTENTION_NAMES),
        offload_src="device", offload_dst="pinned_host"),
}

# Every linear projection of a Block: (sub-module, parameter) -> how many leading input dims it contracts.
PROJECTIONS = {("attention", "wq"): 1, ("attention", "wk"): 1, ("attention", "wv"): 1, ("attention", "wo"): 2,
               ("feed_forward", "w1"): 1, ("feed_forward", "w3"): 1, ("feed_forward", "w2"): 1}


BF16_BITS = jnp.uint16  # how `KVCache` stores bf16 on CPU


def _stored(x: jax.Array, storage: Any) -> jax.Array:
    """`x` as a cache array of dtype `storage` holds it (bf16 bit patterns when `storage` is `BF16_BITS`)."""
    if jnp.dtype(storage) != BF16_BITS:
        return _loaded(x).astype(storage)
    return x if x.dtype == BF16_BITS else jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), BF16_BITS)


def _loaded(x: jax.Array) -> jax.Array:
    """A cache array's values: bf16 from stored bit patterns, anything else as it is."""
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == BF16_BITS else x


@jax.tree_util.register_dataclass
@dataclass
class KVCache:
    """Preallocated keys/values, `[batch, kv_heads, slots, head_dim]` for each layer: a tuple of one array per layer,
    or (for `scan_layers`, whose loop indexes layers) one array stacked on a leading layer axis.

    `index` is the next slot to write; new tokens occupy slots `index .. index+T-1` for every row. Heads come before
    slots because that is the layout attention's matmuls read, and unrolled layers keep separate arrays because a
    layer of a stacked array is a copy to read: on a 2-core CPU, with slots first, transposing copies were 60% of a
    stories110m batch-16 decode step, and with one stacked array the per-layer slices were 60% of a stories15m one.

    On CPU a bf16 cache is stored as its bit patterns (`uint16`), which XLA:CPU writes in place: jax 0.10.2's widens
    a bf16 dynamic-update-slice to float32, so writing one slot converted the whole layer's cache there and back.
    A stories110m batch-16 decode step went from 58 to 49 ms (jax 0.10.2) and from 72 to 41 ms (jax 0.12). `read`
    gives bf16 back, bit for bit.
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    index: jax.Array | int  # the int 0 only inside `Llama.features`' prefill, where slot 0 is known at trace time

    @classmethod
    def create(cls, cfg: LlamaConfig, batch: int, slots: int, dtype: Any = jnp.float32,
               stacked: bool = False) -> "KVCache":
        shape = (batch, cfg.n_kv_heads, slots, cfg.head_dim)
        if jnp.dtype(dtype) == jnp.bfloat16 and current_platform() == "cpu":
            dtype = BF16_BITS
        if stacked:
            k, v = (jnp.zeros((cfg.n_layers, *shape), dtype) for _ in range(2))
        else:
            k, v = (tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)) for _ in range(2))
        return cls(k, v, jnp.zeros((), jnp.int32))

    @property
    def stacked(self) -> bool:
        return not isinstance(self.k, tuple)

    @property
    def slots(self) -> int:
        return (self.k if self.stacked else self.k[0]).shape[2 + self.stacked]

    def map(self, fn: Callable[[jax.Array, int], jax.Array]) -> "KVCache":
        """`fn(array, lead)` applied to every key and value array (`lead` = 1 before the batch axis when stacked)."""
        return KVCache(*(fn(x, 1) if self.stacked else tuple(fn(a, 0) for a in x) for x in (self.k, self.v)),
                       self.index)

    def place(self, other: "KVCache", row: jax.Array | int, slot: jax.Array | int) -> "KVCache":
        """This cache with `other`'s rows written at batch row `row` and slot `slot` (same layer layout)."""
        def put(old: jax.Array, new: jax.Array, lead: int) -> jax.Array:
            return jax.lax.dynamic_update_slice(old, _stored(new, old.dtype), (0,) * lead + (row, 0, slot, 0))
        pairs = ((self.k, other.k), (self.v, other.v))
        if self.stacked:
            return KVCache(*(put(old, new, 1) for old, new in pairs), self.index)
        return KVCache(*(tuple(put(a, b, 0) for a, b in zip(old, new)) for old, new in pairs), self.index)

    def write(self, layer: jax.Array | int, k: jax.Array, v: jax.Array) -> "KVCache":
        """Layer `layer`'s `[B, K, T, H]` keys and values written at slots `index .. index+T-1`."""
        def put(cache: jax.Array | tuple[jax.Array, ...], new: jax.Array) -> jax.Array | tuple[jax.Array, ...]:
            if self.stacked:
                at = (layer, 0, 0, self.index, 0)
                return jax.lax.dynamic_update_slice(cache, _stored(new[None], cache.dtype), at)
            old = cache[layer]
            updated = jax.lax.dynamic_update_slice(old, _stored(new, old.dtype), (0, 0, self.index, 0))
            return (*cache[:layer], updated, *cache[layer + 1:])
        return KVCache(put(self.k, k), put(self.v, v), self.index)

    @property
    def dtype(self) -> Any:
        """What the arrays store (`BF16_BITS` for a bf16 cache on CPU)."""
        return (self.k if self.stacked else self.k[0]).dtype

    def read(self, layer: jax.Array | int) -> tuple[jax.Array, jax.Array]:
        """Layer `layer`'s keys and values, `[B, K, slots, H]`."""
        if self.stacked:
            k, v = (jax.lax.dynamic_index_in_dim(x, layer, keepdims=False) for x in (self.k, self.v))
        else:
            k, v = self.k[layer], self.v[layer]
        return _loaded(k), _loaded(v)


@dataclass(frozen=True)
class Normal:
    """N(0, std^2) draws; kept in each parameter's `init` metadata so `sharding.sharded_init` can redraw it alone."""

    std: float

    def __call__(self, key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        return self.std * jax.random.normal(key, shape, dtype)


@dataclass(frozen=True)
class Constant:
    value: float

    def __call__(self, key: jax.Array | None, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        return jnp.full(shape, self.value, dtype)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype: Any, fan_in: int) -> nnx.Param:
    """A parameter drawn from N(0, 1/fan_in) (LeCun normal, as MaxText initialises LLaMA) carrying its logical axes.

    Small models trained from scratch learn much faster with this than with a flat std of 0.02 (measured on the
    tiny_shakespeare demo: 2.70 vs 3.17 validation bits per byte after 60 steps).
    """
    init = Normal(fan_in ** -0.5)
    return nnx.Param(init(rngs.params(), shape, dtype), axes=axes, init=init)


class RMSNorm(nnx.Module):
    def __init__(self, cfg: LlamaConfig, execution: ExecutionConfig):
        self.eps = cfg.norm_eps
        init = Constant(1.0)
        self.weight = nnx.Param(init(None, (cfg.dim,), jnp.dtype(execution.param_dtype)), axes=("norm",), init=init)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * self.weight[...].astype(x.dtype)


def weight(module: nnx.Module, name: str, dtype: Any) -> jax.Array:
    """`module.<name>` as a `dtype` array: a float parameter cast, a quantized one (`llama_jax.quant`) dequantized."""
    value = getattr(module, name)
    return value.dequantize(dtype) if isinstance(value, QuantizedWeight) else value[...].astype(dtype)


def project(module: nnx.Module, name: str, spec: str, x: jax.Array) -> jax.Array:
    """`einsum(spec, x, module.<name>)` plus the low-rank update of a LoRA adapter attached as `module.lora_<name>`
    (see `llama_jax.lora`); the model itself never creates adapters."""
    y = linear(spec, x, weight(module, name, x.dtype))
    adapter = getattr(module, f"lora_{name}", None)
    return checkpoint_name(y if adapter is None else y + adapter(x), PROJECTION_NAME)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def linear(spec: str, x: jax.Array, w: jax.Array, out_dtype: Any = None) -> jax.Array:
    """`einsum(spec, x, w)` (in `out_dtype` when given), differentiated as the two einsums its gradients are.

    JAX's own transpose of an einsum computes the weight gradient as `(grad^T x)^T`, which XLA:CPU turns into
    transposing copies fused into the producer of `grad`; those fusions are not vectorised, and writing the two
    gradient einsums out took a 24M-parameter CPU train step from 2.02 to 1.65 s.
    """
    x_spec, w_spec, out = operand_specs(spec)
    merged = len(x_spec) + len(w_spec) - len(out)  # letters of the contracted axes, twice
    if merged >= 4 and x_spec.endswith(w_spec[:merged // 2]):
        # Several contracted axes (wo's heads x head_dim) as one: with two, XLA:CPU transposed wo on every decode
        # step rather than the one-token activation (12 copies of 2.4 MB, 6 ms of a 34 ms stories110m step).
        n = merged // 2
        x, w = x.reshape(*x.shape[:-n], -1), w.reshape(-1, *w.shape[n:])
        axis = unused_letter(spec)
        spec = f"{x_spec[:-n]}{axis},{axis}{w_spec[n:]}->{out}"
    return einsum(spec, x, w, out_dtype)


def _linear_fwd(spec: str, x: jax.Array, w: jax.Array, out_dtype: Any
                ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return linear(spec, x, w, out_dtype), (x, w)


def _linear_bwd(spec: str, out_dtype: Any, residuals: tuple[jax.Array, jax.Array], grad: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
    x, w = residuals
    x_spec, w_spec, out = operand_specs(spec)
    grad = grad.astype(x.dtype)
    return (einsum(f"{out},{w_spec}->{x_spec}", grad, w, x.dtype),
            einsum(f"{x_spec},{out}->{w_spec}", x, grad, w.dtype))


linear.defvjp(_linear_fwd, _linear_bwd)


def _after(value: jax.Array, ready: jax.Array) -> jax.Array:
    """`value` `[B, ...]`, made to depend on `ready` `[B, ...]` but never changed (nothing exceeds +inf), so whatever
    consumes it runs after `ready` is computed: XLA does not fold the comparison away, while XLA:CPU removes an
    optimisation barrier before fusion."""
    flag = ready.reshape(ready.shape[0], -1)[:, :1] > jnp.inf
    return jnp.where(flag.reshape(flag.shape[:1] + (1,) * (value.ndim - 1)), jnp.zeros_like(value), value)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, execution: ExecutionConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.implementation = execution.attention
        dt, d, n, k, h = jnp.dtype(execution.param_dtype), cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), dt, d)
        self.wk = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), dt, d)
        self.wv = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), dt, d)
        self.wo = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), dt, n * h)

    def __call__(self, x: jax.Array, rotation: Rotation, visibility: Visibility, cache: KVCache | None = None,
                 layer: jax.Array | int = 0) -> tuple[jax.Array, KVCache | None]:
        """With a cache, write this layer's new keys/values in place at `(layer, :, cache.index)` and attend to all
        of the layer's slots (`visibility` hides the unused ones); a prefill from slot 0 attends to its own tokens."""
        cfg, dt, t = self.cfg, x.dtype, x.shape[1]
        q = checkpoint_name(project(self, "wq", "BTD,DNH->BTNH", x), "query_proj")
        k = checkpoint_name(project(self, "wk", "BTD,DKH->BTKH", x), "key_proj")
        v = checkpoint_name(project(self, "wv", "BTD,DKH->BTKH", x), "value_proj")
        q = constrain(rope(q, rotation), ("batch", "seq", "heads", "head_dim"))
        k = constrain(rope(k, rotation), ("batch", "seq", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
        heads_first = (0, 2, 1, 3)  # [B, T, K, H] <-> the cache's [B, K, T, H]
        if cache is not None and visibility.is_self_attention(t, t):
            # A prefill from slot 0 (`Llama.features`): nothing before its tokens, so they attend among themselves
            # as in training (the kernels, or causal chunks on CPU) over T keys instead of the cache's slots.
            cache = cache.write(layer, k.transpose(heads_first), v.transpose(heads_first))
            out = attention(q, k, v, visibility, self.implementation, strict=False)
        elif cache is not None and t == 1 and cache.dtype == jnp.float32 and current_platform() == "cpu":
            # One new token: attend to the cache as it was and to the new key/value, then write them, the write made
            # to wait for attention. Attending to the cache just written, XLA:CPU duplicated the in-place write into
            # attention's operand and copied each layer's keys and values several times per step (3.4 ms of a 24.8
            # ms stories110m step at batch 1). A bf16 cache stays on the path below: its products need float32 copies
            # of the cache either way, and this order made them slower (stories110m batch 16: 50 -> 80 ms).
            out = cached_attention(q, k, v, *(a.astype(dt) for a in cache.read(layer)), visibility, cache.index)
            k, v = (_after(a, out) for a in (k, v))
            cache = cache.write(layer, k.transpose(heads_first), v.transpose(heads_first))
        else:
            if cache is not None:
                cache = cache.write(layer, k.transpose(heads_first), v.transpose(heads_first))
                k, v = (a.transpose(heads_first).astype(dt) for a in cache.read(layer))
            out = attention(q, k, v, visibility, self.implementation)
        out = checkpoint_name(out, "context")
        return checkpoint_name(project(self, "wo", "BTNH,NHD->BTD", out), "out_proj"), cache


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """`silu(gate) * up`, differentiated from the saved sigmoid of `gate`.

    Autodiff recomputes `sigmoid(gate)` (an exp and a divide) inside the backward fusion that also transposes the
    gate gradient for the weight-gradient matmul; XLA:CPU does not vectorise that transposing fusion, and it took 12%
    of a 24M-parameter train step (242 of 2,087 ms). Saving the sigmoid leaves the backward pass multiplies and adds.
    """
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate: jax.Array, up: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    sig = jax.nn.sigmoid(gate)
    return gate * sig * up, (gate, up, sig)


def _swiglu_bwd(residuals: tuple[jax.Array, jax.Array, jax.Array], grad: jax.Array) -> tuple[jax.Array, jax.Array]:
    gate, up, sig = residuals
    silu = gate * sig
    d_gate, d_up = grad * up * (sig + silu * (1 - sig)), grad * silu
    return jax.lax.optimization_barrier((d_gate, d_up))


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class FeedForward(nnx.Module):
    def __init__(self, cfg: LlamaConfig, execution: ExecutionConfig, rngs: nnx.Rngs):
        dt, d, f = jnp.dtype(execution.param_dtype), cfg.dim, cfg.hidden_dim
        self.w1 = _param(rngs, (d, f), ("embed", "mlp"), dt, d)
        self.w3 = _param(rngs, (d, f), ("embed", "mlp"), dt, d)
        self.w2 = _param(rngs, (f, d), ("mlp", "embed"), dt, f)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = project(self, "w1", "BTD,DF->BTF", x)
        up = project(self, "w3", "BTD,DF->BTF", x)
        hidden = constrain(swiglu(gate, up), ("batch", "seq", "mlp"))
        return project(self, "w2", "BTF,FD->BTD", hidden)


class Block(nnx.Module):
    def __init__(self, cfg: LlamaConfig, execution: ExecutionConfig, rngs: nnx.Rngs):
        self.dropout = execution.dropout
        self.attention_norm = RMSNorm(cfg, execution)
        self.attention = Attention(cfg, execution, rngs)
        self.ffn_norm = RMSNorm(cfg, execution)
        self.feed_forward = FeedForward(cfg, execution, rngs)

    def __call__(self, x: jax.Array, rotation: Rotation, visibility: Visibility, cache: KVCache | None = None,
                 layer: jax.Array | int = 0) -> tuple[jax.Array, KVCache | None]:
        attn, cache = self.attention(self.attention_norm(x), rotation, visibility, cache, layer)
        h = constrain(x + dropout(attn, self.dropout, layer, 0), ("batch", "seq", "act_embed"))
        ffn = dropout(self.feed_forward(self.ffn_norm(h)), self.dropout, layer, 1)
        out = constrain(h + ffn, ("batch", "seq", "act_embed"))
        return out, cache


class Llama(nnx.Module):
    """The LLaMA 2 decoder. `model(tokens)` maps int32 `[batch, seq]` tokens to float32 `[batch, seq, vocab]` logits.

    `cfg` is the architecture (what checkpoints store); `execution` says how it runs (dtypes, remat, layer scan).
    With `cache=KVCache`, the tokens are written at `cache.index` and `(logits, new_cache)` is returned, so prefill
    and step-by-step decoding share this one code path. With `execution.quant`, the projections are born quantized
    (`llama_jax.quant`; a random init is quantized after drawing). `mask` (`[batch, seq, slots]`, True = may attend) and
    `segment_ids` (packed sequences) are combined with the causal mask; `positions` default to
    `cache.index + arange(seq)`. Attention runs through `llama_jax.attention` with `execution.attention`.
    """

    def __init__(self, cfg: LlamaConfig, execution: ExecutionConfig | None = None, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.execution = execution = execution or ExecutionConfig()
        dt = jnp.dtype(execution.param_dtype)
        # Unit-variance embeddings (the first RMSNorm rescales them); a tied table doubles as the output projection,
        # so it takes that projection's 1/dim variance instead.
        embed_fan_in = cfg.dim if cfg.tie_embeddings else 1
        self.tok_embeddings = _param(rngs, (cfg.vocab_size, cfg.dim), ("vocab", "embed"), dt, embed_fan_in)
        if execution.scan_layers:
            self.layers = _stacked_blocks(cfg, execution, rngs)
        else:
            self.layers = nnx.List([Block(cfg, execution, rngs) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg, execution)
        if not cfg.tie_embeddings:
            self.output = _param(rngs, (cfg.dim, cfg.vocab_size), ("embed", "vocab"), dt, cfg.dim)
        if execution.quant != "none":
            quantize_model(self, execution.quant, execution.quant_group_size)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, mask: jax.Array | None = None,
                 cache: KVCache | None = None, segment_ids: jax.Array | None = None,
                 positions_below: int | None = None) -> jax.Array | tuple[jax.Array, KVCache]:
        features, new_cache = self.features(tokens, positions, mask, cache, segment_ids, positions_below)
        logits = self.logits(features)
        return logits if cache is None else (logits, new_cache)

    def features(self, tokens: jax.Array, positions: jax.Array | None = None, mask: jax.Array | None = None,
                 cache: KVCache | None = None, segment_ids: jax.Array | None = None,
                 positions_below: int | None = None) -> tuple[jax.Array, KVCache | None]:
        """The final-norm hidden states `[batch, seq, dim]` (what `logits` projects), and the updated cache.

        `segment_ids` (`[batch, seq]` int32) keep packed sequences from attending across segments; pass their
        `positions` too (each segment's own 0, 1, ...). With a cache they make the call a prefill that fills it from
        slot 0 (left padding as a segment of its own: `inference.generate.prefill_padded`): the tokens attend only
        among themselves, as without a cache, so the attention kernels apply. A caller whose `positions` all lie in
        `[0, positions_below)` (a static bound: the row length of packed rows, `max_seq_len` where generation caps
        lengths) may say so: their RoPE rows are then read from a table instead of computed (`llama_jax.rope`); a
        position past it gives NaN.
        """
        b, t = tokens.shape
        if segment_ids is not None and cache is not None:
            if mask is not None:
                raise ValueError("a prefill with segment_ids takes no mask: the segments say what each token sees")
            cache = KVCache(cache.k, cache.v, 0)  # a prefill from slot 0: statically nothing before its tokens
        if cache is not None and cache.stacked != self.execution.scan_layers:
            raise ValueError(f"this model runs {'scanned' if self.execution.scan_layers else 'unrolled'} layers; "
                             f"create its KV cache with KVCache.create(..., stacked={self.execution.scan_layers})")
        start = cache.index if cache is not None else 0
        cfg = self.cfg
        if positions is None:
            rotation = table_rotation(start, t, t if cache is None else cache.slots, cfg.head_dim, cfg.rope_theta)
        elif positions_below is not None:
            rotation = gathered_rotation(positions, positions_below, cfg.head_dim, cfg.rope_theta)
        else:
            rotation = computed_rotation(positions, cfg.head_dim, cfg.rope_theta)
        visibility = Visibility(start, segment_ids, mask)

        # Gather from a table whole along vocab (an all-gather over `tensor` only); XLA cannot split a gather on it.
        # Cast after the gather: only the looked-up rows, not the whole table, each decode step.
        table = constrain(self.tok_embeddings[...], (None, "embed"))
        x = table[tokens].astype(jnp.dtype(self.execution.dtype))
        x = constrain(x, ("batch", "seq", "act_embed"))
        x, cache = self._run_layers(x, rotation, visibility, cache)
        if cache is not None:
            cache = KVCache(cache.k, cache.v, jnp.asarray(start + t, jnp.int32))
        return self.norm(x), cache

    def logits(self, features: jax.Array, head: jax.Array | None = None) -> jax.Array:
        """float32 `[..., vocab]` logits of final-norm hidden states (a slice of them works too); `head` is the tied
        table as `decode_head` gives it, for a caller that projects with it many times."""
        if head is not None:  # decoding only: no gradient, and one row in halves (`linear`) streamed it more slowly
            logits = jnp.einsum("BTD,DV->BTV", features, head, preferred_element_type=jnp.float32)
        elif self.cfg.tie_embeddings:  # the table as it is stored: `.T` made XLA copy it transposed on every call
            logits = linear("BTD,VD->BTV", features, self.tok_embeddings[...].astype(features.dtype), jnp.float32)
        else:
            logits = linear("BTD,DV->BTV", features, weight(self, "output", features.dtype), jnp.float32)
        return constrain(logits, ("batch", "seq", "vocab"))

    def decode_head(self) -> jax.Array | None:
        """The tied table as a `[dim, vocab]` copy, for float32 decoding on CPU to make once and pass to every
        step's `logits`; None elsewhere (an untied head is stored so already).

        XLA:CPU multiplies one row by `[dim, vocab]` faster than by the stored `[vocab, dim]` (stories15m's table:
        0.85-1.13 ms against 1.26-1.57, 2-core AMD EPYC); the decoder holds the copy meanwhile (+1 table's memory).
        Made inside each jitted step, the copy would cost more than it saves; bf16 rows, padded to two for YNNPACK
        (`llama_jax.einsum`), decoded 4-5% slower with it.
        """
        if (not self.cfg.tie_embeddings or current_platform() != "cpu"
                or jnp.dtype(self.execution.dtype) != jnp.float32):
            return None
        return self.tok_embeddings[...].astype(jnp.float32).T

    def projections(self) -> Iterator[tuple[nnx.Module, str, int]]:
        """`(owner module, parameter name, input dims)` of every linear projection: each block's (one stacked block
        with `scan_layers`), then the untied output head."""
        for block in [self.layers] if self.execution.scan_layers else list(self.layers):
            for (module, name), in_dims in PROJECTIONS.items():
                yield getattr(block, module), name, in_dims
        if not self.cfg.tie_embeddings:
            yield self, "output", 1

    def _run_layers(self, x: jax.Array, rotation: Rotation, visibility: Visibility, cache: KVCache | None
                    ) -> tuple[jax.Array, KVCache | None]:
        """Apply the blocks (a Python loop or one `lax.scan` over stacked weights), with the remat policy.

        The cache travels through the layers whole, so each layer updates its slots in place (no per-step copy).
        """
        policy = self.execution.remat

        def block_fn(graphdef: Any) -> Any:
            def apply(state: Any, h: jax.Array, kv: KVCache | None, layer: Any) -> tuple[jax.Array, Any]:
                return nnx.merge(graphdef, state)(h, rotation, visibility, kv, layer)
            return apply if policy == "none" else jax.checkpoint(apply, policy=REMAT[policy])

        if self.execution.scan_layers:
            graphdef, state = nnx.split(self.layers)
            apply = block_fn(graphdef)

            def body(carry: tuple[jax.Array, Any], layer: tuple[Any, jax.Array]) -> tuple[Any, None]:
                return apply(layer[0], carry[0], carry[1], layer[1]), None

            (x, cache), _ = jax.lax.scan(body, (x, cache), (state, jnp.arange(self.cfg.n_layers)))
            return x, cache

        for i, block in enumerate(self.layers):
            graphdef, state = nnx.split(block)
            x, cache = block_fn(graphdef)(state, x, cache, i)
        return x, cache


def _stacked_blocks(cfg: LlamaConfig, execution: ExecutionConfig, rngs: nnx.Rngs) -> Block:
    """One Block whose parameters carry a leading `layers` axis, for `lax.scan`."""

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers", "axes": "layers"})
    def create(rngs: nnx.Rngs) -> Block:
        return Block(cfg, execution, rngs)

    return create(rngs)
