"""What sampling costs per step on `[batch, vocab]` logits, jitted on the current device: top-p filtering by halving
against sorting the vocabulary, and the draw against `jax.random.categorical`.

Logits are standard normal times `--spread` (a trained model's next-token logits are peaked, so its nucleus is a few
dozen tokens; random weights' are flat, and the nucleus is most of the vocabulary). Printed per spread and top_p: the
nucleus size (mean tokens kept per row), milliseconds for `drop_outside_top_p` and for Meta's rule on the sorted
vocabulary (what it did before), and their ratio; then per spread, milliseconds for `draw` (one uniform per row) and
for `jax.random.categorical` (a Gumbel noise per token) on the same logits. Best of `--repeats` alternating calls.
Defaults: batch 16, vocabulary 32,000, spreads 6, 4 and 3, top_p 0.9 and 0.95.
`python experiments/bench_sampling.py`; a quick run: `python experiments/bench_sampling.py --vocab 1000 --repeats 2`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from peers import record, timed

from llama_jax.inference.sampling import draw, drop_outside_top_p


def sorted_nucleus(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Meta's `sample_top_p` on the sorted vocabulary: a token stays while the mass before it is at most p."""
    order = jnp.argsort(-logits, axis=-1)
    probs = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), order, axis=-1)
    kept = jnp.cumsum(probs, axis=-1) - probs <= top_p
    least = jnp.min(jnp.where(kept, jnp.take_along_axis(logits, order, axis=-1), jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < least, -jnp.inf, logits)


def best_ms(ways: dict[str, Callable], args: tuple, repeats: int) -> dict[str, float]:
    """Best milliseconds of each way, called in turn `repeats` times after a compiling call."""
    for fn in ways.values():
        jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(repeats):
        for way, fn in ways.items():
            times[way].append(1e3 * timed(lambda: jax.block_until_ready(fn(*args)), steps=1, warmup=0))
    return {way: min(t) for way, t in times.items()}


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
    spreads = [float(x) for x in args.spreads.split(",")]
    nucleus = {"halving": jax.jit(drop_outside_top_p), "full sort": jax.jit(sorted_nucleus)}
    draws = {"draw": jax.jit(lambda x, key: draw(x, jax.random.uniform(key, (x.shape[0], 1)))),
             "categorical": jax.jit(lambda x, key: jax.random.categorical(key, x, axis=-1))}
    print(f"{jax.devices()[0].device_kind}, batch {args.batch}, vocabulary {args.vocab:,}")
    print(f"{'spread':>6} {'top_p':>5} {'kept':>8}  {'ms: halving / full sort':<28} {'ratio':>6}")
    for spread in spreads:
        logits = jax.random.normal(jax.random.key(0), (args.batch, args.vocab)) * spread
        for top_p in (float(x) for x in args.top_p.split(",")):
            p = jnp.full((args.batch, 1), top_p, jnp.float32)
            kept = float(np.isfinite(np.asarray(nucleus["halving"](logits, p))).sum(-1).mean())
            ms = best_ms(nucleus, (logits, p), args.repeats)
            fast, full = ms["halving"], ms["full sort"]
            print(f"{spread:>6} {top_p:>5} {kept:>8,.0f}  {fast:>12.2f} / {full:<13.2f} {full / fast:>5.1f}x",
                  flush=True)
            record(args.json, kind="top_p", batch=args.batch, vocab=args.vocab, spread=spread, top_p=top_p,
                   kept=kept, halving_ms=fast, full_sort_ms=full)
    print(f"{'spread':>6} {'':>14}  {'ms: draw / categorical':<28} {'ratio':>6}")
    for spread in spreads:
        logits = jax.random.normal(jax.random.key(0), (args.batch, args.vocab)) * spread
        ms = best_ms(draws, (logits, jax.random.key(1)), args.repeats)
        print(f"{spread:>6} {'':>14}  {ms['draw']:>12.2f} / {ms['categorical']:<13.2f} "
              f"{ms['categorical'] / ms['draw']:>5.1f}x", flush=True)
        record(args.json, kind="draw", batch=args.batch, vocab=args.vocab, spread=spread, draw_ms=ms["draw"],
               categorical_ms=ms["categorical"])


if __name__ == "__main__":
    main()
