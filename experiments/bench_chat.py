"""A chat turn's latency with the KV cache kept from the last turn (`PrefixCache`, what `chat` does) and without it
(the whole dialog run again), with random weights.

A turn is `--message` new user tokens after a `--history` of tokens already in the dialog (default: what fills the
context with the message and `--new-tokens`), decoded step by step through `generate`'s `stream` callback as `chat`
streams it. Printed per model: the time to the first new token and to the whole turn, best of `--repeats` rounds
that alternate the two ways in one process after a compiling round, and their ratio. With `--tokenizer PATH` (its
size sets the vocabulary) a second row times the server's engine (`llama_jax serve`'s continuous batching, in
process): a request resending the dialog plus the message to the slot that holds the dialog, against one whose
second id differs (nothing reusable), its time to the first token as a request for one token. Defaults:
`python experiments/bench_chat.py` (stories15m and stories110m shapes, float32); a quick smoke run:
`python experiments/bench_chat.py --models tiny --history 40 --message 8 --new-tokens 4 --repeats 1`.
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np
from bench_decode import random_model
from peers import add_model_arguments, presets, record

from llama_jax.config import ExecutionConfig
from llama_jax.inference.generate import generate
from llama_jax.inference.prefix_cache import PrefixCache
from llama_jax.model import Llama
from llama_jax.serving.engine import BatchingConfig, Engine, Job
from llama_jax.tokenizer import Tokenizer


def turn(model: Llama, prompt: list[int], new_tokens: int, cache: PrefixCache | None) -> tuple[float, float]:
    """Seconds to the first new token and to the last of one streamed turn."""
    start, first = time.perf_counter(), []

    def stream(tokens: np.ndarray) -> None:
        if not first:
            first.append(time.perf_counter() - start)

    generate(model, [prompt], max_new_tokens=new_tokens, stream=stream, prefix_cache=cache)
    return first[0], time.perf_counter() - start


def bench(model: Llama, history: int, message: int, new_tokens: int, repeats: int) -> dict[str, float]:
    """Best times of a turn with the cache holding `history` (primed, untimed, before each round) and without."""
    rng = np.random.default_rng(0)
    held = rng.integers(3, model.cfg.vocab_size, history).tolist()
    prompt = held + rng.integers(3, model.cfg.vocab_size, message).tolist()
    times: dict[str, list[tuple[float, float]]] = {"cached": [], "full": []}
    for _ in range(repeats + 1):  # the first round compiles
        cache = PrefixCache()
        generate(model, [held], max_new_tokens=1, prefix_cache=cache)  # holds `held`: its one new id is not fed
        times["cached"].append(turn(model, prompt, new_tokens, cache))
        times["full"].append(turn(model, prompt, new_tokens, None))
    return _best(times)


def _best(times: dict[str, list[tuple[float, float]]]) -> dict[str, float]:
    """Milliseconds to the first token and to the turn's end, each the best over the rounds after the first."""
    return {f"{what}_ms_{way}": 1e3 * min(run[i] for run in runs[1:])
            for way, runs in times.items() for i, what in enumerate(("first", "turn"))}


def bench_engine(model: Llama, tokenizer: Tokenizer, history: int, message: int, new_tokens: int,
                 repeats: int) -> dict[str, float]:
    """`bench`'s times through the server's engine: a request that continues the dialog its slot holds, and one
    with as many ids that shares only BOS with it."""
    rng = np.random.default_rng(0)
    held = [tokenizer.bos_id, *rng.integers(3, model.cfg.vocab_size, history - 1).tolist()]
    added = rng.integers(3, model.cfg.vocab_size, message).tolist()
    other = [held[0], 3 + (held[1] - 2) % (model.cfg.vocab_size - 3), *held[2:]]
    engine = Engine(model, tokenizer, BatchingConfig(max_batch=1, batch_wait_ms=0)).start()

    def request(prompt: list[int], max_tokens: int) -> float:
        done = threading.Event()
        start = time.perf_counter()
        engine.submit(Job(prompt, max_tokens, lambda event: event.finish_reason and done.set()))
        if not done.wait(600):
            raise TimeoutError("the engine did not finish a request within 600 s")
        return time.perf_counter() - start

    times: dict[str, list[tuple[float, float]]] = {"cached": [], "full": []}
    try:
        for _ in range(repeats + 1):  # the first round compiles
            for way, start in (("cached", held), ("full", other)):
                request(held, 1)  # the slot holds `held` (its one new id is not fed)
                first = request(start + added, 1)
                request(held, 1)
                times[way].append((first, request(start + added, new_tokens)))
    finally:
        engine.close()
    return _best(times)


def _row(preset: str, way: str, history: int, message: int, new_tokens: int, r: dict[str, float]) -> str:
    return (f"{preset:<12} {way:<9} {history:>7} {message:>7} {new_tokens:>4}  "
            f"{r['first_ms_cached']:>13,.1f} / {r['first_ms_full']:<14,.1f} "
            f"{r['first_ms_full'] / r['first_ms_cached']:>5.2f}x  "
            f"{r['turn_ms_cached']:>10,.1f} / {r['turn_ms_full']:<9,.1f} "
            f"{r['turn_ms_full'] / r['turn_ms_cached']:>5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--history", type=int, help="dialog tokens already run (default: fill the context)")
    parser.add_argument("--message", type=int, default=32, help="the new user message's tokens")
    parser.add_argument("--new-tokens", type=int, default=32, help="reply tokens decoded")
    args = parser.parse_args()
    tokenizer = Tokenizer(args.tokenizer) if args.tokenizer else None
    if min(args.message, args.new_tokens, args.repeats) < 1:
        parser.error("--message, --new-tokens and --repeats must be at least 1")
    runs = []
    for preset, cfg in presets(parser, args, tokenizer and tokenizer.vocab_size):
        history = cfg.max_seq_len - args.message - args.new_tokens if args.history is None else args.history
        if history < 1 or history + args.message + args.new_tokens > cfg.max_seq_len:
            parser.error(f"history {history} + message {args.message} + new {args.new_tokens} must fit {preset}'s "
                         f"context of {cfg.max_seq_len} tokens with a history of at least 1; lower them")
        runs.append((preset, cfg, history))
    print(f"{'model':<12} {'via':<9} {'history':>7} {'message':>7} {'new':>4}  {'first token ms: cached / full':<30} "
          f"{'ratio':>6}  {'turn ms: cached / full':<22} {'ratio':>6}")
    for preset, cfg, history in runs:
        model = random_model(cfg, ExecutionConfig(dtype=args.dtype, param_dtype=args.dtype))
        ways = {"generate": lambda: bench(model, history, args.message, args.new_tokens, args.repeats)}
        if tokenizer is not None:
            ways["engine"] = lambda: bench_engine(model, tokenizer, history, args.message, args.new_tokens,
                                                  args.repeats)
        for way, timed in ways.items():
            r = timed()
            print(_row(preset, way, history, args.message, args.new_tokens, r), flush=True)
            record(args.json, kind="chat_turn", via=way, model=preset, layers=cfg.n_layers, dtype=args.dtype,
                   history=history, message=args.message, new=args.new_tokens, **r)


if __name__ == "__main__":
    main()
