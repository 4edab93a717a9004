"""Prefill and decode throughput of `llama_jax.generate`'s compiled programs, with random weights.

For each model shape and batch size: prefill tokens/s (B x prompt tokens in one pass) and decode tokens/s (B tokens
per step of the jitted `while_loop`, greedy, no EOS so every step runs), after one warm-up run that compiles.
Defaults: `python experiments/bench_decode.py` (stories15m and stories110m shapes, batch 1 and 16, prompt 128,
128 new tokens) on whatever devices jax sees; a quick smoke run:
`python experiments/bench_decode.py --models tiny --batch-sizes 1 --prompt-len 8 --new-tokens 8`.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax.config import LlamaConfig
from llama_jax.inference.generate import PAD, bucket, decode_loop_jit, prefill_jit
from llama_jax.inference.sampling import Sampling
from llama_jax.model import Llama
from llama_jax.sharding import make_mesh, sharded_init


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = jax.block_until_ready(fn())
    return time.perf_counter() - start, result


def bench(preset: str, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict[str, float]:
    """Best-of-`repeats` seconds for prefill and for the decode loop of one (model, batch) setting."""
    cfg = LlamaConfig.preset(preset)
    if prompt_len + new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt {prompt_len} + new {new_tokens} exceeds {preset}'s context of {cfg.max_seq_len}")
    mesh = make_mesh()
    graphdef, params = nnx.split(sharded_init(lambda: Llama(cfg, rngs=nnx.Rngs(0)), mesh))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len), dtype=np.int32)
    pad = np.zeros((batch,), np.int32)
    n_out = bucket(new_tokens, 1)
    args = dict(sampling=Sampling(), slots=prompt_len + n_out, n_out=n_out)
    eos, max_new = jnp.int32(PAD), jnp.int32(new_tokens)

    def prefill():
        return prefill_jit(graphdef, params, tokens, pad, jax.random.key(0), eos, **args)

    prefill_s, decode_s = [], []
    with jax.set_mesh(mesh):
        for _ in range(repeats + 1):  # the first round compiles
            seconds, state = _timed(prefill)
            prefill_s.append(seconds)
            seconds, state = _timed(lambda: decode_loop_jit(graphdef, params, state, eos, max_new,
                                                            sampling=args["sampling"]))
            decode_s.append(seconds)
    assert int(state.step) == new_tokens
    prefill_best, decode_best = min(prefill_s[1:]), min(decode_s[1:])
    return dict(params_m=cfg.num_params() / 1e6, prefill_tok_s=batch * prompt_len / prefill_best,
                decode_tok_s=batch * (new_tokens - 1) / decode_best, ms_per_step=1e3 * decode_best / (new_tokens - 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="stories15m,stories110m", help="comma-separated LlamaConfig presets")
    parser.add_argument("--batch-sizes", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per row")
    parser.add_argument("--new-tokens", type=int, default=128, help="generated tokens per row (>= 2)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs after the compiling one (best is kept)")
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (the first token comes from prefill)")

    devices = jax.devices()
    print(f"devices: {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}); prompt {args.prompt_len}, "
          f"new {args.new_tokens}, greedy, float32")
    header = f"{'model':<12} {'params':>8} {'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'ms/step':>8}"
    print(header)
    print("-" * len(header))
    for preset in args.models.split(","):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            r = bench(preset, batch, args.prompt_len, args.new_tokens, args.repeats)
            print(f"{preset:<12} {r['params_m']:>7.1f}M {batch:>5} {r['prefill_tok_s']:>14,.0f} "
                  f"{r['decode_tok_s']:>13,.1f} {r['ms_per_step']:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
