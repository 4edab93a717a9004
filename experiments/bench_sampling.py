"""Top-p (nucleus) filtering of `[batch, vocab]` logits: from the most likely candidates against sorting the whole
vocabulary, jitted on the current device.

Logits are standard normal times `--spread` (a trained model's next-token logits are peaked, so its nucleus is a few
dozen tokens; random weights' are flat, and the nucleus is most of the vocabulary). Printed per top_p: the nucleus
size (mean tokens kept per row), milliseconds for `drop_outside_top_p` with `NUCLEUS_CANDIDATES` candidates and with
every token a candidate (the full sort it always did), best of `--repeats` alternating calls, and their ratio.
Defaults: batch 16, vocabulary 32,000, spreads 6, 4 and 3, top_p 0.9 and 0.95.
`python experiments/bench_sampling.py`; a quick run: `python experiments/bench_sampling.py --vocab 1000 --repeats 2`.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from peers import record

from llama_jax.inference.sampling import NUCLEUS_CANDIDATES, drop_outside_top_p


def milliseconds(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return 1e3 * (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--spreads", default="6,4,3", help="comma-separated logit scales (peaked ... flat)")
    parser.add_argument("--top-p", default="0.9,0.95", help="comma-separated top_p values below 1")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls of each way (best is kept)")
    parser.add_argument("--json", help="append each result as a JSON line to this file")
    args = parser.parse_args()
    if min(args.batch, args.vocab, args.repeats) < 1:
        parser.error("--batch, --vocab and --repeats must be at least 1")
    if not all(0 < float(p) < 1 for p in args.top_p.split(",")):
        parser.error(f"--top-p {args.top_p}: every value must lie in (0, 1); top_p 1 filters nothing")
    ways = {"candidates": jax.jit(drop_outside_top_p),
            "full sort": jax.jit(lambda x, p: drop_outside_top_p(x, p, candidates=args.vocab))}
    print(f"{jax.devices()[0].device_kind}, batch {args.batch}, vocabulary {args.vocab:,}, "
          f"{NUCLEUS_CANDIDATES} candidates")
    print(f"{'spread':>6} {'top_p':>5} {'kept':>8}  {'ms: candidates / full sort':<28} {'ratio':>6}")
    for spread in (float(x) for x in args.spreads.split(",")):
        logits = jax.random.normal(jax.random.key(0), (args.batch, args.vocab)) * spread
        for top_p in (float(x) for x in args.top_p.split(",")):
            p = jnp.full((args.batch, 1), top_p, jnp.float32)
            kept = float(np.isfinite(np.asarray(ways["candidates"](logits, p))).sum(-1).mean())
            times: dict[str, list[float]] = {way: [] for way in ways}
            for fn in ways.values():
                jax.block_until_ready(fn(logits, p))  # compile
            for _ in range(args.repeats):
                for way, fn in ways.items():
                    times[way].append(milliseconds(fn, logits, p))
            fast, full = min(times["candidates"]), min(times["full sort"])
            print(f"{spread:>6} {top_p:>5} {kept:>8,.0f}  {fast:>12.2f} / {full:<13.2f} {full / fast:>5.1f}x",
                  flush=True)
            record(args.json, kind="top_p", batch=args.batch, vocab=args.vocab, spread=spread, top_p=top_p,
                   kept=kept, candidates_ms=fast, full_sort_ms=full)


if __name__ == "__main__":
    main()
