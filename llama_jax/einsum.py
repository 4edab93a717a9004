"""`einsum` for the model's matrix products: on CPU, bf16 products come back through a float32 result.

XLA:CPU runs a bf16 x bf16 -> float32 dot in YNNPACK's bf16 kernels (1,260 GFLOP/s on this project's 2-core
Sapphire Rapids, which has AMX), but upcasts both operands of a bf16 x bf16 -> bf16 dot and runs it in float32
(250 GFLOP/s). Asking for float32 and rounding afterwards gives the same numbers (both accumulate in float32) and
took the bf16 train step of the 24M-parameter bench config from 1,146 to 2,377-2,687 tokens/s (with attention's
backward products, `llama_jax.attention`). Other platforms, and float16, keep the 16-bit result, which their kernels
write directly.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from llama_jax.sharding import current_platform


def einsum(spec: str, x: jax.Array, y: jax.Array, out_dtype: Any = None) -> jax.Array:
    """`jnp.einsum(spec, x, y)` in `out_dtype` (default: the operands' common dtype)."""
    out_dtype = jnp.dtype(jnp.result_type(x, y) if out_dtype is None else out_dtype)
    if out_dtype == jnp.bfloat16 and current_platform() == "cpu":
        return jnp.einsum(spec, x, y, preferred_element_type=jnp.float32).astype(out_dtype)
    return jnp.einsum(spec, x, y, preferred_element_type=out_dtype)
