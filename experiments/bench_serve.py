"""Requests/s, tokens/s and p50/p99 latency of `python -m llama_jax serve` under 1, 8 and 32 concurrent clients.

Saves a random-weight model of the chosen shape (default `stories15m`, vocabulary = the tokenizer's) in HF format,
starts the server as a subprocess on 127.0.0.1, and for each concurrency level runs `--warmup-rounds` unmeasured
rounds (they compile the shapes that level reaches; which slot counts a burst passes through depends on arrival
times, so one round may not meet them all) and then `--rounds` rounds in which every client sends one non-streaming
completion of `--max-tokens` tokens (random weights rarely emit EOS, so each request decodes them all), greedy unless
`--temperature` (and `--top-p`) ask to sample.
`python experiments/bench_serve.py --tokenizer tokenizer.model`; a smoke run:
`python experiments/bench_serve.py --tokenizer tok.model --shape tiny --concurrency 1 2 --max-tokens 4 --rounds 1`.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from flax import nnx

from llama_jax import Llama, LlamaConfig, Tokenizer, save_pretrained
from llama_jax.inference.sampling import Sampling

WORDS = "the king said that all the world is a stage and every man plays his part in time".split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(checkpoint: Path, tokenizer: str, port: int, max_batch: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "llama_jax", "serve", "--checkpoint", str(checkpoint), "--tokenizer", tokenizer,
         "--port", str(port), "--model-name", "bench", "--max-batch", str(max_batch), "--max-queue", "256"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(1200):  # up to 120 s to load and bind
        if server.poll() is not None:
            raise RuntimeError(f"server exited: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.kill()
    raise RuntimeError("server did not answer /health within 120 s")


async def _round(url: str, clients: int, max_tokens: int, prompt_words: int, offset: int, sampling: dict[str, float]
                 ) -> tuple[float, list[float], int]:
    """Wall seconds, per-request latencies and completion tokens of `clients` simultaneous requests."""
    async with httpx.AsyncClient(timeout=600) as http:
        async def one(i: int) -> tuple[float, int]:
            words = [WORDS[(offset + i + k) % len(WORDS)] for k in range(prompt_words)]
            start = time.perf_counter()
            r = await http.post(url, json={"model": "bench", "prompt": " ".join(words), "max_tokens": max_tokens,
                                           "seed": offset * clients + i, **sampling})
            r.raise_for_status()
            return time.perf_counter() - start, r.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(clients)))
        return time.perf_counter() - start, [s for s, _ in results], sum(n for _, n in results)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True, help="sentencepiece .model (its size sets the vocabulary)")
    p.add_argument("--shape", default="stories15m", help="model preset whose shape is served (random weights)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=24)
    p.add_argument("--rounds", type=int, default=2, help="measured rounds per concurrency level")
    p.add_argument("--warmup-rounds", type=int, default=2, help="unmeasured rounds first, per level")
    p.add_argument("--temperature", type=float, default=0.0, help="sent with every request (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="sent with every request (1 = off)")
    args = p.parse_args()
    try:
        Sampling(temperature=args.temperature, top_p=args.top_p)
    except ValueError as err:
        p.error(f"--temperature / --top-p: {err}")
    sampling = {"temperature": args.temperature, "top_p": args.top_p}

    tok = Tokenizer(args.tokenizer)
    cfg = LlamaConfig.preset(args.shape, vocab_size=tok.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = save_pretrained(Llama(cfg, rngs=nnx.Rngs(0)), Path(tmp) / "model", format="hf")
        port = _free_port()
        server = _start_server(checkpoint, args.tokenizer, port, max(args.concurrency))
        url = f"http://127.0.0.1:{port}/v1/completions"
        print(f"{args.shape} ({cfg.num_params() / 1e6:.1f}M params), {args.max_tokens} new tokens per request, "
              f"~{len(tok.encode(' '.join(WORDS[:args.prompt_words])))}-token prompts, "
              f"{'greedy' if args.temperature == 0 else f'temperature {args.temperature}, top_p {args.top_p}'}")
        print("| clients | requests/s | tokens/s | p50 latency (s) | p99 latency (s) |")
        print("|---|---|---|---|---|")
        try:
            for clients in args.concurrency:
                for _ in range(args.warmup_rounds):  # compiles
                    asyncio.run(_round(url, clients, args.max_tokens, args.prompt_words, 0, sampling))
                wall, latencies, tokens = 0.0, [], 0
                for r in range(args.rounds):
                    seconds, lat, n = asyncio.run(_round(url, clients, args.max_tokens, args.prompt_words, r + 1,
                                                         sampling))
                    wall, latencies, tokens = wall + seconds, latencies + lat, tokens + n
                p50, p99 = np.percentile(latencies, [50, 99])
                print(f"| {clients} | {len(latencies) / wall:.2f} | {tokens / wall:.0f} | {p50:.2f} | {p99:.2f} |",
                      flush=True)
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
