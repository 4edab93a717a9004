"""Loss scaling for float16 training (`optim.loss_scale`): small gradients survive fp16, overflows skip the update.

float16 has 5 exponent bits: gradients below ~6e-8 flush to zero and values above 65504 become Inf. The train step
multiplies the loss by `scale` before differentiating and divides the (float32 master) gradients by it after, so
the backward pass runs in fp16's usable range. The scale lives in the optimizer state (`LossScaleState`, saved and
resumed with it) and follows the dynamic rule of `torch.amp.GradScaler`, jmp and flax's `DynamicScale`: start at
2^16, double after `optim.loss_scale_period` (2000) overflow-free steps in a row, and on an Inf/NaN gradient halve
it and skip that update (parameters and moments untouched). An overflow is expected and costs one step; only when the
scale cannot drop further (a static scale, or the dynamic one at 1) is it a non-finite step for `train.nonfinite`.

Written here rather than taken from jmp (unreleased since January 2023) or flax's `DynamicScale` (it wraps
`value_and_grad` itself and updates once per call, so it cannot sit around `optim.accumulate_gradients`'s
microbatch loop, which must check and rescale once per optimizer step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from llama_jax.config import ExecutionConfig, OptimConfig

INITIAL_SCALE = 2.0**16  # torch.amp.GradScaler's and flax DynamicScale's default start
MIN_SCALE = 1.0


class LossScaleState(NamedTuple):
    scale: jax.Array  # float32: what the next step multiplies the loss by
    clean_steps: jax.Array  # int32: overflow-free steps since the scale last changed
    skipped: jax.Array  # int32: updates skipped for overflow so far in the run
    inner: Any  # the wrapped optimizer's state


@dataclass(frozen=True)
class LossScaling:
    """The resolved `optim.loss_scale`: a starting scale, and whether it adapts (else it stays fixed)."""

    initial: float
    dynamic: bool
    period: int

    @classmethod
    def from_config(cls, optim: OptimConfig, execution: ExecutionConfig) -> LossScaling | None:
        """None when the loss is not scaled: `none`, or `auto` (the default) for any compute dtype but float16."""
        setting = optim.loss_scale
        if setting == "auto":
            setting = "dynamic" if execution.dtype == "float16" else "none"
        if setting == "none":
            return None
        if setting == "dynamic":
            return cls(INITIAL_SCALE, True, optim.loss_scale_period)
        return cls(float(setting), False, optim.loss_scale_period)

    def wrap(self, inner: optax.GradientTransformation) -> optax.GradientTransformation:
        """`inner` applied to unscaled gradients when they are all finite; otherwise zero updates and `inner`'s state
        kept. Either way the scale moves by the dynamic rule (a static scale never moves)."""

        def init(params: Any) -> LossScaleState:
            return LossScaleState(jnp.float32(self.initial), jnp.int32(0), jnp.int32(0), inner.init(params))

        def update(grads: Any, state: LossScaleState, params: Any = None) -> tuple[Any, LossScaleState]:
            finite = jnp.stack([jnp.isfinite(g).all() for g in jax.tree.leaves(grads)]).all()
            updates, inner_state = inner.update(grads, state.inner, params)
            updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
            inner_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), inner_state, state.inner)
            scale, clean = state.scale, state.clean_steps
            if self.dynamic:
                grow = finite & (clean + 1 >= self.period)
                scale = jnp.where(finite, jnp.where(grow, scale * 2, scale), jnp.maximum(scale / 2, MIN_SCALE))
                clean = jnp.where(finite & ~grow, clean + 1, 0)
            skipped = state.skipped + (~finite).astype(jnp.int32)
            return updates, LossScaleState(scale, clean, skipped, inner_state)

        return optax.GradientTransformation(init, update)

    def absorbs_overflow(self, state: LossScaleState) -> jax.Array:
        """Whether an Inf/NaN gradient at this state is the scale's to handle (it can still be lowered)."""
        return jnp.asarray(self.dynamic) & (state.scale > MIN_SCALE)
