"""Best-of-K sampling (rejection sampling's shape): K samples of each prompt with its prefill run once, against a
batch of as many distinct prompts of the same length, where every row is prefilled, with random weights.

`generate` runs each distinct prompt of a batch once and copies its keys and values to the rows that sample it
(`generate.distinct_prompts`); a batch of `--prompts` x `--samples` distinct rows is the same work without that.
Printed per model: milliseconds for the first token (a call for one new token: the prefill and one sample) and for
the whole batch (`--new-tokens` sampled at temperature 1, no EOS, so every row runs every step), best of `--repeats`
rounds that alternate the two batches in one process after a compiling round, and their ratio. With `--tokenizer
PATH` (its size sets the vocabulary) a second row times the server's engine (`llama_jax serve`, in process) on the
same rows sent at once (a request with `n` = `--samples`, per prompt), where a row copies a prompt another slot
holds and runs only its last 16 ids. Defaults:
`python experiments/bench_samples.py` (stories15m and stories110m shapes, float32, 4 prompts x 4 samples of 128
tokens, 64 new); a quick smoke run:
`python experiments/bench_samples.py --models tiny --prompt-len 16 --new-tokens 4 --repeats 1`.
"""

from __future__ import annotations

import argparse
import itertools
import threading
import time
from collections.abc import Callable

import numpy as np
from bench_decode import random_model
from peers import add_model_arguments, presets, record

from llama_jax.config import ExecutionConfig
from llama_jax.inference.generate import generate
from llama_jax.model import Llama
from llama_jax.serving.engine import BatchingConfig, Engine, Job
from llama_jax.tokenizer import Tokenizer


def timed(model: Llama, rows: list[list[int]], new_tokens: int) -> float:
    start = time.perf_counter()
    generate(model, rows, max_new_tokens=new_tokens, temperature=1.0)
    return time.perf_counter() - start


def engine_timed(engine: Engine, rows: list[list[int]], new_tokens: int) -> float:
    """Seconds until the engine has finished every row, sent at once (temperature 1, seed = the row's index)."""
    left, done = [len(rows)], threading.Event()

    def finished(event) -> None:
        if event.finish_reason:
            left[0] -= 1
            if not left[0]:
                done.set()

    start = time.perf_counter()
    for k, row in enumerate(rows):
        engine.submit(Job(row, new_tokens, finished, temperature=1.0, seed=k))
    if not done.wait(600):
        raise TimeoutError("the engine did not finish the rows within 600 s")
    return time.perf_counter() - start


def batches(model: Llama, prompts: int, samples: int, prompt_len: int) -> dict[str, list[list[int]]]:
    """K samples of each prompt ("shared"), and as many distinct prompts of the same length ("every")."""
    distinct = np.random.default_rng(0).integers(3, model.cfg.vocab_size, (prompts * samples, prompt_len)).tolist()
    return {"shared": [p for p in distinct[:prompts] for _ in range(samples)], "every": distinct}


def bench(rows: dict[str, list[list[int]]], run: Callable[[list[list[int]], int], float], new_tokens: int,
          repeats: int) -> dict[str, float]:
    """Best milliseconds to the first token and for the whole batch of each way, `run(rows, new tokens)` timing one."""
    times: dict[str, list[tuple[float, float]]] = {way: [] for way in rows}
    for _ in range(repeats + 1):  # the first round compiles
        for way, batch in rows.items():
            times[way].append((run(batch, 1), run(batch, new_tokens)))
    return {f"{what}_ms_{way}": 1e3 * min(r[i] for r in runs[1:])
            for way, runs in times.items() for i, what in enumerate(("first", "batch"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--prompts", type=int, default=4, help="distinct prompts per batch")
    parser.add_argument("--samples", type=int, default=4, help="samples of each prompt")
    parser.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens sampled per row")
    args = parser.parse_args()
    tokenizer = Tokenizer(args.tokenizer) if args.tokenizer else None
    if min(args.prompts, args.samples, args.prompt_len, args.new_tokens, args.repeats) < 1:
        parser.error("--prompts, --samples, --prompt-len, --new-tokens and --repeats must be at least 1")
    configs = presets(parser, args, tokenizer and tokenizer.vocab_size)
    for preset, cfg in configs:
        if args.prompt_len + args.new_tokens > cfg.max_seq_len:
            parser.error(f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} must fit {preset}'s "
                         f"context of {cfg.max_seq_len} tokens; lower them")
    print(f"{'model':<12} {'via':<9} {'rows':>5} {'prompt':>6} {'new':>4}  {'first token ms: shared / every':<31} "
          f"{'ratio':>6}  {'batch ms: shared / every':<25} {'ratio':>6}")
    size = f"{args.prompts}x{args.samples}"
    for preset, cfg in configs:
        model = random_model(cfg, ExecutionConfig(dtype=args.dtype, param_dtype=args.dtype))
        rows = batches(model, args.prompts, args.samples, args.prompt_len)
        ways = {"generate": lambda: bench(rows, lambda r, n: timed(model, r, n), args.new_tokens, args.repeats)}
        if tokenizer is not None:
            ways["engine"] = lambda: _engine_bench(model, tokenizer, rows, args.new_tokens, args.repeats)
        for way, measure in ways.items():
            r = measure()
            print(f"{preset:<12} {way:<9} {size:>5} {args.prompt_len:>6} {args.new_tokens:>4}  "
                  f"{r['first_ms_shared']:>14,.1f} / {r['first_ms_every']:<14,.1f} "
                  f"{r['first_ms_every'] / r['first_ms_shared']:>5.2f}x  "
                  f"{r['batch_ms_shared']:>11,.1f} / {r['batch_ms_every']:<11,.1f} "
                  f"{r['batch_ms_every'] / r['batch_ms_shared']:>5.2f}x", flush=True)
            record(args.json, kind="best_of_k", via=way, model=preset, layers=cfg.n_layers, dtype=args.dtype,
                   prompts=args.prompts, samples=args.samples, prompt_len=args.prompt_len, new=args.new_tokens, **r)


def _engine_bench(model: Llama, tokenizer: Tokenizer, rows: dict[str, list[list[int]]], new_tokens: int,
                  repeats: int) -> dict[str, float]:
    """`bench` through the engine; each call's rows begin with an id of their own, so that no row reuses what a slot
    kept from an earlier call (every call would then run 16 ids a row)."""
    engine = Engine(model, tokenizer, BatchingConfig(max_batch=len(rows["every"]), batch_wait_ms=50)).start()
    calls = itertools.count(1)

    def run(batch: list[list[int]], n: int) -> float:
        first = 3 + next(calls) % (model.cfg.vocab_size - 3)
        return engine_timed(engine, [[first, *row[1:]] for row in batch], n)

    try:
        return bench(rows, run, new_tokens, repeats)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
