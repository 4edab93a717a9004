"""PPO's rollout (sampling) throughput against its training throughput, on one mesh, and what gathering buys.

A random policy of a preset shape is sharded fsdp over every device jax sees (8 simulated CPU devices with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`). Rollouts run `rollout.Sampler` on the live train-state
parameters, with `ppo.gather_weights` off (the decode loop reads fsdp-sharded weights, re-gathering them every step)
and on (one all-gather per rollout); every row decodes `--new-tokens` tokens (no EOS). The train step is PPO's
(policy + shared value head, one AdamW step) on those rollouts' sequences. Rates are medians of `--repeats` timed
runs after a compiling warm-up; rollout tokens are generated tokens, train tokens every position of the sequences.

    python experiments/bench_rollout.py                                   # tiny preset, batch 32, 16 + 64 tokens
    python experiments/bench_rollout.py --preset stories15m --batch 64
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax.alignment.ppo import PpoTrainer
from llama_jax.alignment.rollout import Sampler
from llama_jax.config import Config, LlamaConfig, PpoConfig
from llama_jax.inference.generate import PAD
from llama_jax.model import Llama
from llama_jax.sharding import make_mesh, sharded_init


def bench(preset: str, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict[str, float]:
    model_cfg = LlamaConfig.preset(preset)
    cfg = Config(model=model_cfg, ppo=PpoConfig(batch_size=batch, minibatch_size=batch, max_new_tokens=new_tokens,
                                                critic="shared"))
    mesh = make_mesh(cfg.mesh)
    trainer = PpoTrainer(cfg, mesh, sharded_init(lambda: Llama(model_cfg, rngs=nnx.Rngs(0)), mesh))
    state = trainer.init_state()
    prompts = np.random.default_rng(0).integers(3, model_cfg.vocab_size, (batch, prompt_len)).tolist()
    rates = {}
    for gather in (False, True):
        trainer.sampler = Sampler(gather)
        runs = [trainer.rollout(state, prompts, PAD, seed) for seed in range(repeats + 1)][1:]
        rates[f"rollout_tokens_per_s (gather {'on' if gather else 'off'})"] = float(np.median(
            [r.tokens_per_s for r in runs]))
    sequences = runs[-1].sequences()
    prepared = jax.device_get(trainer.prepare(state, trainer.put(sequences), jnp.zeros((batch,))))
    rows = trainer.put({**sequences, **{k: prepared[k] for k in ("old_logp", "old_values", "returns",
                                                                  "advantages")}})
    seconds = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        state, metrics = trainer.train_step(state, rows)
        jax.block_until_ready(metrics)
        if i:
            seconds.append(time.perf_counter() - start)
    rates["train_tokens_per_s"] = sequences["tokens"].size / float(np.median(seconds))
    return rates


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="model shape (tiny, stories15m, llama2-7b, ...)")
    parser.add_argument("--batch", type=int, default=32, help="rollouts per batch (a multiple of the device count)")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up (median reported)")
    args = parser.parse_args()
    print(f"{jax.device_count()} x {jax.devices()[0].device_kind}, {args.preset}, batch {args.batch}, prompt "
          f"{args.prompt_len} + {args.new_tokens} new tokens")
    for name, rate in bench(args.preset, args.batch, args.prompt_len, args.new_tokens, args.repeats).items():
        print(f"{name:<40} {rate:,.0f}")
