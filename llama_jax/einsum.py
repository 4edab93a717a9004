"""`einsum` for the model's matrix products, shaped for XLA:CPU's kernels: bf16 products come back through a
float32 result, one bf16 row is padded to two, and one float32 row is multiplied by the halves of the weight.

XLA:CPU runs a bf16 x bf16 -> float32 dot in YNNPACK's bf16 kernels (1,260 GFLOP/s on this project's 2-core
Sapphire Rapids, which has AMX), but upcasts both operands of a bf16 x bf16 -> bf16 dot and runs it in float32
(250 GFLOP/s). Asking for float32 and rounding afterwards gives the same numbers (both accumulate in float32) and
took the bf16 train step of the 24M-parameter bench config from 1,146 to 2,377-2,687 tokens/s (with attention's
backward products, `llama_jax.attention`). Other platforms, and float16, keep the 16-bit result, which their kernels
write directly.

A single row (a decode step at batch 1) is padded to two: XLA:CPU multiplies one bf16 row in float32, on float32
copies of the weight that it makes on every call (a per-token step: the server, streaming) or once per decode loop,
held beside the weights throughout. Two rows take the bf16 kernel and make no copy.

A single float32 row is multiplied by the two halves of a weight's input axis (a free reshape) in one batched
product, and the halves' products summed: XLA:CPU runs a matrix-vector product on one core (as fast as on one core
alone, measured), the two halves on both. On a 2-core AMD EPYC a decode step at batch 1 went from 18.5 to 16.4-16.9
ms (stories110m) and from 2.8 to 2.4 (stories15m); splitting in four was no faster, nor was splitting at batch 16 or
a bf16 row.
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
    if current_platform() != "cpu":
        return jnp.einsum(spec, x, y, preferred_element_type=out_dtype)
    row = _single_row_axis(spec, x)
    if operands == out_dtype == jnp.float32 and row is not None:
        return _in_halves(spec, x, y)
    if jnp.bfloat16 not in (operands, out_dtype):
        return jnp.einsum(spec, x, y, preferred_element_type=out_dtype)
    if operands != jnp.bfloat16 or row is None:
        return jnp.einsum(spec, x, y, preferred_element_type=jnp.float32).astype(out_dtype)
    padded = jnp.pad(x, [(0, int(i == row)) for i in range(x.ndim)])
    product = jnp.einsum(spec, padded, y, preferred_element_type=jnp.float32)
    x_spec, _, out = operand_specs(spec)
    return jax.lax.slice_in_dim(product, 0, 1, axis=out.index(x_spec[row])).astype(out_dtype)


def operand_specs(spec: str) -> tuple[str, str, str]:
    """`"BTD,DF->BTF"` -> `("BTD", "DF", "BTF")`."""
    inputs, out = spec.split("->")
    x_spec, y_spec = inputs.split(",")
    return x_spec, y_spec, out


def unused_letter(spec: str) -> str:
    """A lower-case axis letter that `spec` does not use (the model's specs use upper case)."""
    return next(c for c in "abcdefghijklmnopqrstuvwxyz" if c not in spec)


def _single_row_axis(spec: str, x: jax.Array) -> int | None:
    """The first of `x`'s row axes (kept in the output, not contracted) when there is just one row, else None."""
    x_spec, y_spec, out = operand_specs(spec)
    row_axes = [axis for axis, letter in enumerate(x_spec) if letter in out and letter not in y_spec]
    return row_axes[0] if row_axes and all(x.shape[axis] == 1 for axis in row_axes) else None


def _in_halves(spec: str, x: jax.Array, y: jax.Array) -> jax.Array:
    """`jnp.einsum(spec, x, y)` for float32 `x` with one row, as the sum of two products over halves of `y`'s leading
    axis when that axis is contracted (the model's `[in, out]` weights), which XLA:CPU runs side by side."""
    x_spec, y_spec, out = operand_specs(spec)
    lead = y_spec[0]
    if lead not in x_spec or lead in out or y.shape[0] % 2:
        # An output axis (the tied head's [vocab, dim] table: splitting it was no faster), a batch axis, or odd.
        return jnp.einsum(spec, x, y)
    axis, half = x_spec.index(lead), unused_letter(spec)
    x_halves = x.reshape(*x.shape[:axis], 2, x.shape[axis] // 2, *x.shape[axis + 1:])
    y_halves = y.reshape(2, y.shape[0] // 2, *y.shape[1:])
    return jnp.einsum(f"{x_spec[:axis]}{half}{x_spec[axis:]},{half}{y_spec}->{half}{out}", x_halves, y_halves).sum(0)
