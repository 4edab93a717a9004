"""`einsum` for the model's matrix products: on CPU, bf16 products come back through a float32 result.

XLA:CPU runs a bf16 x bf16 -> float32 dot in YNNPACK's bf16 kernels (1,260 GFLOP/s on this project's 2-core
Sapphire Rapids, which has AMX), but upcasts both operands of a bf16 x bf16 -> bf16 dot and runs it in float32
(250 GFLOP/s). Asking for float32 and rounding afterwards gives the same numbers (both accumulate in float32) and
took the bf16 train step of the 24M-parameter bench config from 1,146 to 2,377-2,687 tokens/s (with attention's
backward products, `llama_jax.attention`). Other platforms, and float16, keep the 16-bit result, which their kernels
write directly.

A single row (a decode step at batch 1) is padded to two: XLA:CPU multiplies one bf16 row in float32, on float32
copies of the weight that it makes on every call (a per-token step: the server, streaming) or once per decode loop,
held beside the weights throughout. Two rows take the bf16 kernel and make no copy.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from llama_jax.sharding import current_platform


def einsum(spec: str, x: jax.Array, y: jax.Array, out_dtype: Any = None) -> jax.Array:
    """`jnp.einsum(spec, x, y)` in `out_dtype` (default: the operands' common dtype)."""
    operands = jnp.dtype(jnp.result_type(x, y))
    out_dtype = operands if out_dtype is None else jnp.dtype(out_dtype)
    if current_platform() != "cpu" or jnp.bfloat16 not in (operands, out_dtype):
        return jnp.einsum(spec, x, y, preferred_element_type=out_dtype)
    axis = _single_row_axis(spec, x) if operands == jnp.bfloat16 else None
    if axis is None:
        return jnp.einsum(spec, x, y, preferred_element_type=jnp.float32).astype(out_dtype)
    padded = jnp.pad(x, [(0, int(i == axis)) for i in range(x.ndim)])
    product = jnp.einsum(spec, padded, y, preferred_element_type=jnp.float32)
    x_spec, _, out = operand_specs(spec)
    return jax.lax.slice_in_dim(product, 0, 1, axis=out.index(x_spec[axis])).astype(out_dtype)


def operand_specs(spec: str) -> tuple[str, str, str]:
    """`"BTD,DF->BTF"` -> `("BTD", "DF", "BTF")`."""
    inputs, out = spec.split("->")
    x_spec, y_spec = inputs.split(",")
    return x_spec, y_spec, out


def _single_row_axis(spec: str, x: jax.Array) -> int | None:
    """The first of `x`'s row axes (kept in the output, not contracted) when there is just one row, else None."""
    x_spec, y_spec, out = operand_specs(spec)
    row_axes = [axis for axis, letter in enumerate(x_spec) if letter in out and letter not in y_spec]
    return row_axes[0] if row_axes and all(x.shape[axis] == 1 for axis in row_axes) else None
