"""Weight-only int8 / int4 quantization of the `Llama` projections, for inference and as a frozen QLoRA base.

Every linear projection of a block (wq, wk, wv, wo, w1, w2, w3) and the untied output head is stored as integers
plus float scales and dequantized on the fly where `llama_jax.model.weight` reads it (the einsum then runs in the
compute dtype). Token embeddings, norms and a tied embedding table stay float: a decode step gathers only one row
of the embedding table, so quantizing it saves memory but no bandwidth.

- `int8`: symmetric, one scale per output channel (per layer when stacked) over the whole input.
- `int4`: symmetric, one scale per group of `quant_group_size` consecutive input features (of the flattened input,
  so for `wo` a group spans `group / head_dim` heads when head_dim is smaller) per output channel.
Symmetric because weights are centred on zero: a zero point would cost a subtraction in every matmul and storage
beside every scale for about one level of 16 gained (and qwix's bound of qmax + 0.5 already uses -8 / -128).

The numerics are qwix's (`qwix.quantize` with absmax calibration, `qwix.dequantize`): scale = absmax / (qmax + 0.5),
q = round-half-even(w / scale) saturated to the integer range. qwix's PTQ provider (`qwix.quantize_model`) was
tried first and does not fit this model: it swaps weights for quantized ones lazily inside the first forward call
and finds them by intercepting `einsum`, but our blocks run as `nnx.merge`d copies inside `jax.checkpoint` /
`lax.scan`, so every block projection stayed float32 (only the output head was converted), and the quantized head
then failed on our `.astype` ("Unsupported type: QArray"). So qwix provides the quantizer and the `QArray`
arithmetic; this module places the result in the parameter tree, where Orbax saves it (int4 stored as int4) and
the sharding rules place it like the weight it replaces.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from llama_jax.config import ConfigError

BITS = {"int8": 8, "int4": 4}


class QuantizedParam(nnx.Param):
    """The integer values or the scales of a quantized weight: saved and sharded with the parameters, never trained
    (a quantized base is frozen; QLoRA trains only its `LoRAParam` adapters)."""


class QuantizedWeight(nnx.Module):
    """A weight as integer `qvalue` (the weight's own shape and axes) and float `scale` (same rank: 1 on every input
    axis per-channel, or the number of groups along it)."""

    def __init__(self, qvalue: jax.Array, scale: jax.Array, axes: tuple[str | None, ...], scale_axes: tuple[Any, ...]):
        self.qvalue = QuantizedParam(qvalue, axes=axes)
        self.scale = QuantizedParam(scale, axes=scale_axes)

    def dequantize(self, dtype: Any) -> jax.Array:
        return qwix.dequantize(qwix.QArray(self.qvalue[...], self.scale[...])).astype(dtype)


def group_tiles(shape: tuple[int, ...], in_axes: range, group: int, name: str) -> dict[int, int]:
    """qwix `tiled_axes` that make each scale cover `group` consecutive features of the flattened input (the whole
    input when it is narrower than `group`): trailing input axes whole, then a tile of the rest of the group."""
    tiles, remaining = {}, group
    for axis in reversed(in_axes):
        size = shape[axis]
        if remaining >= size and remaining % size == 0:
            tiles[axis], remaining = size, remaining // size
        elif remaining < size and size % remaining == 0:
            tiles[axis], remaining = remaining, 1
        elif remaining > 1:
            raise ConfigError(f"execution.quant_group_size {group} does not split the input of {name} "
                              f"(input dims {[shape[a] for a in in_axes]}); choose one that divides them")
        else:
            tiles[axis] = 1
    return tiles


def quantize_weight(param: nnx.Param, in_dims: int, quant: str, group: int, name: str = "weight") -> QuantizedWeight:
    """`param` (model layout: an optional leading `layers` axis, `in_dims` input axes, then the output axes)
    quantized as `quant` (int8 per output channel, int4 in groups of `group` input features)."""
    value = param[...]
    axes = tuple(param.get_metadata().get("axes") or (None,) * value.ndim)
    lead = 1 if axes[:1] == ("layers",) else 0
    in_axes = range(lead, lead + in_dims)
    keep = [a for a in range(value.ndim) if a not in in_axes]
    tiles = group_tiles(value.shape, in_axes, group, name) if quant == "int4" else {a: value.shape[a] for a in in_axes}
    q = qwix.quantize(value, getattr(jnp, quant), channelwise_axes=keep, tiled_axes=tiles)
    scale_axes = tuple(None if a in in_axes else axes[a] for a in range(value.ndim))
    return QuantizedWeight(q.qvalue, q.scale, axes, scale_axes)


def is_quantized(model: Any) -> bool:
    return model.execution.quant != "none"


def _set_execution(model: Any, quant: str, group: int) -> None:
    model.execution = dataclasses.replace(model.execution, quant=quant, quant_group_size=group)


def quantize_model(model: Any, quant: str, group: int = 128) -> Any:
    """Quantize every float projection of `model` (a `Llama`) in place as `quant` (int8 | int4); returns it."""
    if quant not in BITS:
        raise ConfigError(f"quantization '{quant}' is not one of {sorted(BITS)}")
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
    if current.quant == quant and (quant == "none" or current.quant_group_size == group):
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
