"""Check and time attention implementations against the XLA reference on the current device.

    python experiments/check_attention.py --impls cudnn                 # on a GPU: llama2-7b shapes
    python experiments/check_attention.py --impls splash --seq 128 --heads 4 --kv-heads 2 --head-dim 16 --batch 1

For each implementation: the largest absolute difference from `xla` in the output and the relative (norm) difference
in the gradients of q, k, v (bf16, grouped-query heads, causal, and packed segment ids; both within 2e-2), then the
median forward+backward time of both.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from peers import record

from llama_jax.attention import Visibility, attention

TOLERANCE = 2e-2  # bf16


def loss_and_grads(impl: str, visibility: Visibility):
    def loss(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        out = attention(q, k, v, visibility, impl)
        return jnp.sum(out.astype(jnp.float32) * jnp.cos(jnp.arange(out.shape[-1], dtype=jnp.float32)))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def median_seconds(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impls", default="cudnn", help="comma-separated implementations to check against xla")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--json", help="append each result as a JSON line to this file")
    args = parser.parse_args()

    b, t = args.batch, args.seq
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((b, t, args.heads, args.head_dim)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.standard_normal((b, t, args.kv_heads, args.head_dim)), jnp.bfloat16) for _ in range(2))
    cuts = np.sort(rng.choice(np.arange(1, t), size=(b, 3), replace=False), axis=1)
    segments = jnp.asarray((np.arange(t)[None, :, None] >= cuts[:, None, :]).sum(-1), jnp.int32)
    print(f"device {jax.devices()[0].device_kind}; q {q.shape} k/v {k.shape} bf16", flush=True)
    for impl in args.impls.split(","):
        for name, vis in (("causal", Visibility()), ("segments", Visibility(0, segments))):
            ref_fn, got_fn = loss_and_grads("xla", vis), loss_and_grads(impl, vis)
            (_, ref), (_, got) = ref_fn(q, k, v), got_fn(q, k, v)
            out_err = float(jnp.max(jnp.abs(attention(q, k, v, vis, impl).astype(jnp.float32)
                                            - attention(q, k, v, vis, "xla").astype(jnp.float32))))
            grad_err = max(float(jnp.linalg.norm((g - r).astype(jnp.float32)) / jnp.linalg.norm(r.astype(jnp.float32)))
                           for g, r in zip(got, ref))
            ref_s, got_s = median_seconds(ref_fn, q, k, v), median_seconds(got_fn, q, k, v)
            verdict = "PASS" if out_err <= TOLERANCE and grad_err <= TOLERANCE else "FAIL"
            print(f"{impl} {name}: max |out - xla| {out_err:.2e}, |grad - xla| / |xla| {grad_err:.2e} {verdict}; "
                  f"fwd+bwd {1e3 * got_s:.2f} ms vs xla {1e3 * ref_s:.2f} ms ({ref_s / got_s:.1f}x)", flush=True)
            record(args.json, kind="attention", impl=impl, mask=name, out_err=out_err, grad_err=grad_err,
                   verdict=verdict, ms=1e3 * got_s, xla_ms=1e3 * ref_s, device=jax.devices()[0].device_kind)


if __name__ == "__main__":
    main()
