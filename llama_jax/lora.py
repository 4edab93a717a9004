"""LoRA adapters for the `Llama` projections: attach, merge into the base weights, and select for training.

An adapter on projection `W` (model layout, input dims first) adds `alpha / rank * dropout(x) @ A @ B` to `x @ W`,
with `A: [*in, rank]` and `B: [rank, *out]`; B starts at zero, so a fresh adapter leaves the model unchanged.
Adapters are attached as `lora_<param>` attributes (which `llama_jax.model.project` picks up), their weights are
`LoRAParam`s (float32 whatever the base dtype) so a filter separates them from the frozen base, and with
`scan_layers` they carry the same leading layer axis as the weights they adapt. Over a quantized base
(`execution.quant`, QLoRA) the adapters are float32 as always and the base stays int8/int4; merging dequantizes it.

qwix was evaluated first: its NNX LoRA creates adapter weights lazily inside the first forward call and picks them
by module path, but our blocks run as `nnx.merge`d copies inside `jax.checkpoint`/`lax.scan` (so lazily created
weights are lost) and q, k, v, o live in one module (so they cannot be targeted one by one).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax.config import ConfigError, LoraConfig
from llama_jax.dropout import dropout
from llama_jax.model import Llama
from llama_jax.quant import QuantizedWeight, dequantize_model

# Short target names (PEFT's module names also accepted) -> (sub-module, parameter) inside a Block.
TARGETS = {
    "q": ("attention", "wq"), "k": ("attention", "wk"), "v": ("attention", "wv"), "o": ("attention", "wo"),
    "gate": ("feed_forward", "w1"), "up": ("feed_forward", "w3"), "down": ("feed_forward", "w2"),
}
PEFT_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
                "down": "down_proj"}
INPUT_DIMS = {"wo": 2}  # wo contracts (heads, head_dim); every other projection one input dim

class LoRAParam(nnx.Param):
    """An adapter weight: trainable while the rest of the model stays frozen."""


class LoRA(nnx.Module):
    """`scale * dropout(x) @ A @ B` for one projection (optionally stacked over `layers` for `lax.scan`)."""

    def __init__(self, weight: nnx.Param, rank: int, alpha: float, dropout: float, stacked: bool, rngs: nnx.Rngs,
                 in_dims: int = 1, tag: int = 0):
        lead = 1 if stacked else 0
        shape, axes = weight.shape, tuple(weight.get_metadata().get("axes") or (None,) * len(weight.shape))
        in_shape, out_shape = shape[lead:lead + in_dims], shape[lead + in_dims:]
        layer_shape, layer_axes = shape[:lead], axes[:lead]
        bound = 1.0 / math.sqrt(math.prod(in_shape))  # PEFT's kaiming_uniform(a=sqrt(5)) on A
        self.a = LoRAParam(jax.random.uniform(rngs.params(), (*layer_shape, *in_shape, rank), jnp.float32,
                                              -bound, bound),
                           axes=(*layer_axes, *axes[lead:lead + in_dims], None))
        self.b = LoRAParam(jnp.zeros((*layer_shape, rank, *out_shape), jnp.float32),
                           axes=(*layer_axes, None, *axes[lead + in_dims:]))
        self.scale = alpha / rank
        self.dropout = dropout
        self.tag = tag  # distinct per adapter, so each draws its own dropout mask

    def __call__(self, x: jax.Array) -> jax.Array:
        a, b = self.a[...].astype(x.dtype), self.b[...].astype(x.dtype)
        low = jnp.tensordot(dropout(x, self.dropout, self.tag), a, axes=a.ndim - 1)
        return jnp.tensordot(low, b, axes=1) * jnp.asarray(self.scale, x.dtype)

    def delta(self) -> jax.Array:
        """The full weight update `scale * A @ B` in the adapted parameter's layout (per layer when stacked)."""
        a, b = self.a[...], self.b[...]
        if is_stacked(self):
            return jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1))(a, b) * self.scale
        return jnp.tensordot(a, b, axes=1) * self.scale


def is_stacked(adapter: LoRA) -> bool:
    axes = adapter.a.get_metadata().get("axes") or ()
    return bool(axes) and axes[0] == "layers"


def resolve_targets(targets: list[str]) -> list[str]:
    """Short names (q, k, v, o, gate, up, down) for config `lora.targets`: names, PEFT module names (`q_proj`), or
    regular expressions over either (`.*_proj`, `q|v`); an entry that matches nothing is an error."""
    if not targets:
        raise ConfigError("lora.targets is empty; list modules such as [q, k, v, o] or a pattern like '.*'")
    chosen = []
    for pattern in targets:
        hits = [short for short, peft in PEFT_MODULES.items()
                if re.fullmatch(pattern, short) or re.fullmatch(pattern, peft)]
        if not hits:
            raise ConfigError(f"lora.targets entry '{pattern}' matches no module; use q, k, v, o, gate, up, down "
                              "(or q_proj ... down_proj, or a pattern)")
        chosen += [h for h in hits if h not in chosen]
    return [short for short in TARGETS if short in chosen]


def _blocks(model: Llama) -> list[Any]:
    return [model.layers] if model.execution.scan_layers else list(model.layers)


def attach(model: Llama, cfg: LoraConfig, rngs: nnx.Rngs) -> Llama:
    """Attach fresh adapters (B = 0) to the targeted projections of every layer, in place; returns `model`."""
    if cfg.rank <= 0:
        raise ConfigError(f"lora.rank must be positive to attach adapters, got {cfg.rank}")
    if not 0 <= cfg.dropout < 1:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {cfg.dropout}")
    stacked = model.execution.scan_layers
    tag = 0
    for block in _blocks(model):
        for short in resolve_targets(cfg.targets):
            module_name, param = TARGETS[short]
            module = getattr(block, module_name)
            base = getattr(module, param)
            base = base.qvalue if isinstance(base, QuantizedWeight) else base  # same shape and axes
            setattr(module, f"lora_{param}", LoRA(base, cfg.rank, cfg.alpha, cfg.dropout, stacked, rngs,
                                                  INPUT_DIMS.get(param, 1), tag))
            tag += 1
    return model


def adapters(model: Llama) -> Iterator[tuple[int | None, str, Any, str, LoRA]]:
    """`(layer or None when stacked, short name, module, parameter name, adapter)` for every attached adapter."""
    for index, block in enumerate(_blocks(model)):
        for short, (module_name, param) in TARGETS.items():
            module = getattr(block, module_name)
            adapter = getattr(module, f"lora_{param}", None)
            if adapter is not None:
                yield (None if model.execution.scan_layers else index), short, module, param, adapter


def merge(model: Llama) -> Llama:
    """Fold every adapter into its base weight (`W + scale * A @ B`, in the weight's dtype) and detach it, in place;
    the result is a plain `Llama` that saves in any checkpoint format (a quantized base is dequantized first)."""
    dequantize_model(model)
    for _, _, module, param, adapter in list(adapters(model)):
        weight = getattr(module, param)
        weight[...] = (weight[...].astype(jnp.float32) + adapter.delta()).astype(weight.dtype)
        delattr(module, f"lora_{param}")
    return model


def trainable_count(state: Any) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))
