"""Best-of-K sampling (rejection sampling's shape): K samples of each prompt with its prefill run once, against a
batch of as many distinct prompts of the same length, where every row is prefilled, with random weights.

`generate` runs each distinct prompt of a batch once and copies its keys and values to the rows that sample it
(`generate.distinct_prompts`); a batch of `--prompts` x `--samples` distinct rows is the same work without that.
Printed per model: milliseconds for the first token (a call for one new token: the prefill and one sample) and for
the whole batch (`--new-tokens` sampled at temperature 1, no EOS, so every row runs every step), best of `--repeats`
rounds that alternate the two batches in one process after a compiling round, and their ratio. Defaults:
`python experiments/bench_samples.py` (stories15m and stories110m shapes, float32, 4 prompts x 4 samples of 128
tokens, 64 new); a quick smoke run:
`python experiments/bench_samples.py --models tiny --prompt-len 16 --new-tokens 4 --repeats 1`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from bench_decode import random_model
from peers import record

from llama_jax.config import ExecutionConfig, LlamaConfig
from llama_jax.inference.generate import generate
from llama_jax.model import Llama


def timed(model: Llama, rows: list[list[int]], new_tokens: int) -> float:
    start = time.perf_counter()
    generate(model, rows, max_new_tokens=new_tokens, temperature=1.0)
    return time.perf_counter() - start


def bench(model: Llama, prompts: int, samples: int, prompt_len: int, new_tokens: int,
          repeats: int) -> dict[str, float]:
    """Best milliseconds to the first token and for the whole batch, shared prefill ("shared") and not ("every")."""
    rng = np.random.default_rng(0)
    distinct = rng.integers(3, model.cfg.vocab_size, (prompts * samples, prompt_len)).tolist()
    batches = {"shared": [p for p in distinct[:prompts] for _ in range(samples)], "every": distinct}
    times: dict[str, list[tuple[float, float]]] = {way: [] for way in batches}
    for _ in range(repeats + 1):  # the first round compiles
        for way, rows in batches.items():
            times[way].append((timed(model, rows, 1), timed(model, rows, new_tokens)))
    return {f"{what}_ms_{way}": 1e3 * min(run[i] for run in runs[1:])
            for way, runs in times.items() for i, what in enumerate(("first", "batch"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="stories15m,stories110m", help="comma-separated LlamaConfig presets")
    parser.add_argument("--layers", type=int, help="override each preset's layer count")
    parser.add_argument("--prompts", type=int, default=4, help="distinct prompts per batch")
    parser.add_argument("--samples", type=int, default=4, help="samples of each prompt")
    parser.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens sampled per row")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the compiling one (best is kept)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and compute")
    parser.add_argument("--json", help="append each result as a JSON line to this file")
    args = parser.parse_args()
    if min(args.prompts, args.samples, args.prompt_len, args.new_tokens, args.repeats) < 1:
        parser.error("--prompts, --samples, --prompt-len, --new-tokens and --repeats must be at least 1")
    configs = []
    for preset in args.models.split(","):
        try:
            cfg = LlamaConfig.preset(preset, **({} if args.layers is None else {"n_layers": args.layers}))
        except ValueError as err:
            parser.error(str(err))
        if args.prompt_len + args.new_tokens > cfg.max_seq_len:
            parser.error(f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} must fit {preset}'s "
                         f"context of {cfg.max_seq_len} tokens; lower them")
        configs.append((preset, cfg))
    print(f"{'model':<12} {'rows':>9} {'prompt':>6} {'new':>4}  {'first token ms: shared / every':<31} {'ratio':>6}  "
          f"{'batch ms: shared / every':<25} {'ratio':>6}")
    for preset, cfg in configs:
        model = random_model(cfg, ExecutionConfig(dtype=args.dtype, param_dtype=args.dtype))
        r = bench(model, args.prompts, args.samples, args.prompt_len, args.new_tokens, args.repeats)
        rows = f"{args.prompts}x{args.samples}"
        print(f"{preset:<12} {rows:>9} {args.prompt_len:>6} {args.new_tokens:>4}  "
              f"{r['first_ms_shared']:>14,.1f} / {r['first_ms_every']:<14,.1f} "
              f"{r['first_ms_every'] / r['first_ms_shared']:>5.2f}x  "
              f"{r['batch_ms_shared']:>11,.1f} / {r['batch_ms_every']:<11,.1f} "
              f"{r['batch_ms_every'] / r['batch_ms_shared']:>5.2f}x", flush=True)
        record(args.json, kind="best_of_k", model=preset, layers=cfg.n_layers, dtype=args.dtype,
               prompts=args.prompts, samples=args.samples, prompt_len=args.prompt_len, new=args.new_tokens, **r)


if __name__ == "__main__":
    main()
