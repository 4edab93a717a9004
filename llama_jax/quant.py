"""Weight-only int8 / int4 quantization of the `Llama` projections, for inference and as a frozen QLoRA base.

Every linear projection of a block (wq, wk, wv, wo, w1, w2, w3) and the untied output head is stored as integers
plus float scales and dequantized on the fly where `llama_jax.model.weight` reads it (the einsum then runs in the
compute dtype). Token embeddings, norms and a tied embedding table stay float: a decode step gathers only one row
of the embedding table, so quantizing it saves memory but no bandwidth.

- `int8`: symmetric, one scale per output channel (per layer when stacked) over the whole input, q in [-127, 127].
- `int4`: symmetric, one scale per group of `quant_group_size` consecutive input features (of the flattened input,
  so for `wo` a group spans `group / head_dim` heads when head_dim is smaller) per output channel, q in [-7, 7];
  stored as JAX's `int4` dtype, which Orbax writes and reads natively.
Symmetric (scale = absmax / qmax) because LLaMA weights are centred on zero: a zero point would add a subtraction
to every dequantization and a second array beside every scale for one extra level of 16.

qwix (0.1.8) was evaluated first and is not used. Its PTQ provider (`qwix.quantize_model`) swaps weights for
quantized ones lazily inside the first forward call, finding them by intercepting `einsum`; our blocks run as
`nnx.merge`d copies inside `jax.checkpoint` / `lax.scan`, so every block projection stayed float32 (only the output
head was converted), and the converted head then failed on the model's `.astype` ("Unsupported type: QArray").
Its array quantizer (`qwix.quantize`) computes scales and values through divisions that XLA turns into multiplies
by rounded reciprocals, so its integers are not reproducible by a NumPy quantizer (21 of 4096 int8 values one
level off, scales one ulp off), and it uses the bound qmax + 0.5. What remained to borrow (dequantize: one
multiply) does not justify a dependency, so the few lines below do it with IEEE divisions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax.config import ConfigError

QMAX = {"int8": 127, "int4": 7}


class QuantizedParam(nnx.Param):
    """The integer values or the scales of a quantized weight: saved and sharded with the parameters, never trained
    (a quantized base is frozen; QLoRA trains only its `LoRAParam` adapters)."""


class QuantizedWeight(nnx.Module):
    """A weight as integer `qvalue` (the weight's own shape and axes) and float `scale`
    `[*layers, groups, *out]`; `in_dims` / `out_dims` count the weight's input and output axes."""

    def __init__(self, qvalue: jax.Array, scale: jax.Array, axes: tuple[str | None, ...], in_dims: int, out_dims: int):
        lead = qvalue.ndim - in_dims - out_dims
        self.qvalue = QuantizedParam(qvalue, axes=axes)
        self.scale = QuantizedParam(scale, axes=(*axes[:lead], None, *axes[lead + in_dims:]))
        self.in_dims, self.out_dims = in_dims, out_dims

    def dequantize(self, dtype: Any) -> jax.Array:
        """`qvalue * scale` (in the scale's dtype, exact) cast to `dtype`; works on one layer of a stacked weight."""
        q, scale = self.qvalue[...], self.scale[...]
        lead = q.ndim - self.in_dims - self.out_dims
        grouped = q.reshape(*q.shape[:lead], scale.shape[lead], -1, *q.shape[lead + self.in_dims:])
        return (grouped.astype(scale.dtype) * jnp.expand_dims(scale, lead + 1)).reshape(q.shape).astype(dtype)


def group_width(n_in: int, quant: str, group: int, name: str = "weight") -> int:
    """Input features per scale: all of them for int8, `group` (at most all) for int4; a group that does not divide
    the input is a one-line ConfigError naming the weight."""
    size = n_in if quant == "int8" else min(group, n_in)
    if n_in % size:
        raise ConfigError(f"execution.quant_group_size {group} does not split the {n_in} input features of {name}; "
                          "choose one that divides them")
    return size


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def quantize_array(w: jax.Array, lead: int, in_dims: int, quant: str, group: int) -> tuple[jax.Array, jax.Array]:
    """(integers in `w`'s shape, scales `[*lead, groups, *out]`) of `w` (`lead` layer axes, `in_dims` input axes,
    then output axes): scale = absmax / qmax over each group of the flattened input, q = round-half-even(w / scale)
    in [-qmax, qmax], an all-zero group taking scale 1. The divisors pass an optimization barrier, so XLA divides as
    IEEE does instead of multiplying by a rounded reciprocal (which moved 21 of 4096 int8 values by one level)."""
    qmax = QMAX[quant]
    n_in = math.prod(w.shape[lead:lead + in_dims])
    size = group_width(n_in, quant, group)
    out_shape = w.shape[lead + in_dims:]
    x = w.astype(jnp.float32).reshape(*w.shape[:lead], n_in // size, size, *out_shape)
    absmax = jnp.max(jnp.abs(x), axis=lead + 1, keepdims=True)
    scale = absmax / jax.lax.optimization_barrier(jnp.full(absmax.shape, qmax, jnp.float32))
    scale = jnp.where(scale == 0, jnp.float32(1), scale)
    q = jnp.round(x / jax.lax.optimization_barrier(jnp.broadcast_to(scale, x.shape)))
    q = jnp.clip(q, -qmax, qmax).astype(getattr(jnp, quant)).reshape(w.shape)
    return q, jnp.squeeze(scale, lead + 1).astype(w.dtype)


def quantize_weight(param: nnx.Param, in_dims: int, quant: str, group: int, name: str = "weight") -> QuantizedWeight:
    """`param` (model layout: an optional leading `layers` axis, `in_dims` input axes, then the output axes)
    quantized as `quant` (int8 per output channel, int4 in groups of `group` input features)."""
    value = param[...]
    axes = tuple(param.get_metadata().get("axes") or (None,) * value.ndim)
    lead = 1 if axes[:1] == ("layers",) else 0
    group_width(math.prod(value.shape[lead:lead + in_dims]), quant, group, name)
    q, scale = quantize_array(value, lead, in_dims, quant, group)
    return QuantizedWeight(q, scale, axes, in_dims, value.ndim - lead - in_dims)


def is_quantized(model: Any) -> bool:
    return model.execution.quant != "none"


def _set_execution(model: Any, quant: str, group: int) -> None:
    model.execution = dataclasses.replace(model.execution, quant=quant, quant_group_size=group)


def quantize_model(model: Any, quant: str, group: int = 128) -> Any:
    """Quantize every float projection of `model` (a `Llama`) in place as `quant` (int8 | int4); returns it."""
    if quant not in QMAX:
        raise ConfigError(f"quantization '{quant}' is not one of {sorted(QMAX)}")
    for owner, name, in_dims in model.projections():
        weight = getattr(owner, name)
        if not isinstance(weight, QuantizedWeight):
            setattr(owner, name, quantize_weight(weight, in_dims, quant, group, name))
    _set_execution(model, quant, group)
    return model


def dequantize_model(model: Any) -> Any:
    """Replace every quantized projection by its dequantized float weight (in the model's `param_dtype`), in place."""
    dtype = jnp.dtype(model.execution.param_dtype)
    for owner, name, _ in model.projections():
        weight = getattr(owner, name)
        if isinstance(weight, QuantizedWeight):
            setattr(owner, name, nnx.Param(weight.dequantize(dtype), axes=weight.qvalue.get_metadata()["axes"]))
    _set_execution(model, "none", model.execution.quant_group_size)
    return model


def requantize(model: Any, quant: str, group: int) -> Any:
    """`model` quantized as `quant`/`group` asks (none = float): unchanged, quantized, or dequantized first."""
    current = model.execution
    if current.quant == quant and (quant != "int4" or current.quant_group_size == group):  # int8 has no groups
        return model
    if current.quant != "none":
        dequantize_model(model)
    return quantize_model(model, quant, group) if quant != "none" else model


def dequantized(model: Any) -> Any:
    """A float copy of a quantized model (the model itself when it is float)."""
    return dequantize_model(nnx.clone(model)) if is_quantized(model) else model


def parameter_bytes(state: Iterable[Any]) -> int:
    """Bytes the parameters take packed (int4 values at half a byte each, as on disk)."""
    leaves = jax.tree.leaves(state)
    return sum(x.size * (0.5 if x.dtype == jnp.int4 else x.dtype.itemsize) for x in leaves)
