"""What GPUs and TPUs run, checked on CPU.

The CPU-only speed-ups (attention in causal query chunks, one-token attention before the cache write, products with a
float32 result, one row in halves, a bf16 cache stored as bit patterns) are chosen by `current_platform()` when a
program is traced. With it answering "gpu", the same model traces the plain paths an accelerator compiles (XLA
attention in one piece: the cuDNN and splash kernels have their own tests). Those programs must give the CPU paths'
numbers, so they stay checked while no accelerator is at hand.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llama_jax.attention
import llama_jax.einsum
import llama_jax.model
from llama_jax import KVCache, Llama, LlamaConfig
from llama_jax.config import ExecutionConfig
from llama_jax.inference import generate as gen

CFG = LlamaConfig.preset("tiny")  # grouped-query attention: 4 heads over 2 kv heads
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, CFG.vocab_size, (2, CFG.max_seq_len)), jnp.int32)
CHOOSERS = (llama_jax.attention, llama_jax.einsum, llama_jax.model)  # the modules that ask `current_platform()`


def traced_on(platform: str, fn: Callable[..., Any], *args: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, str]:
    """`fn(*args)`, jitted and traced afresh with `current_platform()` answering `platform`, as NumPy arrays, and
    the program's StableHLO text."""
    with monkeypatch.context() as patch:
        for module in CHOOSERS:
            patch.setattr(module, "current_platform", lambda: platform)
        jitted = nnx.jit(lambda *a: fn(*a))
        return jax.tree.map(np.asarray, jitted(*args)), jitted.lower(*args).as_text()


def both(fn: Callable[..., Any], *args: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """(CPU result, accelerator result) of `fn(*args)`, after checking the two traced different programs."""
    cpu, cpu_text = traced_on("cpu", fn, *args, monkeypatch=monkeypatch)
    gpu, gpu_text = traced_on("gpu", fn, *args, monkeypatch=monkeypatch)
    assert cpu_text != gpu_text, "the platform switch changed nothing: the test would compare a program to itself"
    return cpu, gpu


def model(**execution) -> Llama:
    return Llama(CFG, ExecutionConfig(attention="xla", **execution), rngs=nnx.Rngs(0))


def logits_and_grads(m: Llama) -> tuple[jax.Array, nnx.State]:
    """Training's forward pass over 256 tokens (4 query chunks on CPU) and the gradients of a loss over all of it."""
    def loss(m: Llama) -> tuple[jax.Array, jax.Array]:
        logits = m(TOKENS)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 7]), logits

    grads, logits = nnx.grad(loss, has_aux=True)(m)
    return logits, nnx.state(grads, nnx.Param)


def test_training_programs_agree_in_float32(monkeypatch):
    (cpu_logits, cpu_grads), (gpu_logits, gpu_grads) = both(logits_and_grads, model(), monkeypatch=monkeypatch)
    np.testing.assert_allclose(cpu_logits, gpu_logits, atol=1e-5, rtol=0)
    for (path, cpu), (_, gpu) in zip(jax.tree_util.tree_leaves_with_path(cpu_grads),
                                     jax.tree_util.tree_leaves_with_path(gpu_grads), strict=True):
        np.testing.assert_allclose(cpu, gpu, atol=1e-7, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_training_programs_agree_in_bf16(monkeypatch):
    """bf16 compute: on CPU the products ask for float32 and round, elsewhere they write bf16, and the rounding falls
    in other places. Each side's logits stay within the README's bf16 bound (0.05) of the float32 ones, and the two
    sides' mean difference is under half of each one's mean difference from float32 (0.0033 vs 0.0071 measured)."""
    float32, _ = traced_on("cpu", logits_and_grads, model(), monkeypatch=monkeypatch)[0]
    (cpu, _), (gpu, _) = both(logits_and_grads, model(dtype="bfloat16"), monkeypatch=monkeypatch)
    for bf16 in (cpu, gpu):
        np.testing.assert_allclose(bf16, float32, atol=0.05, rtol=0)
    assert np.abs(cpu - gpu).mean() < 0.5 * min(np.abs(cpu - float32).mean(), np.abs(gpu - float32).mean())


def decode(m: Llama, tokens: jax.Array, cache: KVCache) -> list[jax.Array]:
    """Prefill 16 tokens into `cache`, then decode 4 more one at a time: the logits of every call."""
    logits, cache = m(tokens[:, :16], cache=cache)
    steps = [logits]
    for t in range(16, 20):
        logits, cache = m(tokens[:, t:t + 1], cache=cache)
        steps.append(logits)
    return steps


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype, atol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_decoding_programs_agree(batch, dtype, atol, monkeypatch):
    """Batch 1 takes the single-row products (halves in float32, two rows in bf16); the bf16 cache is created on
    each side as that platform stores it (bit patterns on CPU)."""
    m = model(dtype=dtype)
    tokens = TOKENS[:batch, :20]

    def run(m: Llama, tokens: jax.Array) -> list[jax.Array]:
        return decode(m, tokens, KVCache.create(CFG, batch=batch, slots=32, dtype=jnp.dtype(dtype)))

    cpu, gpu = both(run, m, tokens, monkeypatch=monkeypatch)
    for step, (c, g) in enumerate(zip(cpu, gpu, strict=True)):
        np.testing.assert_allclose(c, g, atol=atol, rtol=0, err_msg=f"call {step}")


def test_left_padded_prefill_programs_agree(monkeypatch):
    """`generate`'s prefill (left padding as a segment of its own, attention among the prompt's tokens: causal
    chunks on CPU) and two one-token steps over its cache; bf16 judged as training's is (above)."""
    tokens, pad = (jnp.asarray(a) for a in gen.left_pad([list(TOKENS[0, :11]), list(TOKENS[1, :128])], 128))

    def run(m: Llama, tokens: jax.Array, pad: jax.Array) -> jax.Array:
        logits, cache = gen.prefill_padded(m, tokens, pad, 136)
        steps = [logits[:, None]]
        for t in range(2):
            logits, cache = gen.forward_padded(m, TOKENS[:2, 128 + t:129 + t], pad, cache)
            steps.append(logits)
        return jnp.concatenate(steps, axis=1)

    cpu, gpu = both(run, model(), tokens, pad, monkeypatch=monkeypatch)
    np.testing.assert_allclose(cpu, gpu, atol=1e-5, rtol=0)
    cpu16, gpu16 = both(run, model(dtype="bfloat16"), tokens, pad, monkeypatch=monkeypatch)
    for bf16 in (cpu16, gpu16):
        np.testing.assert_allclose(bf16, cpu, atol=0.05, rtol=0)
    assert np.abs(cpu16 - gpu16).mean() < 0.5 * min(np.abs(cpu16 - cpu).mean(), np.abs(gpu16 - cpu).mean())
