"""Throughput of the streaming data pipeline alone, and whether it keeps up with the demo's train step.

    python experiments/bench_data.py                      # a generated JSONL corpus, the demo's batch shape
    python experiments/bench_data.py --corpus "data/*.jsonl" --tokenizer tokenizer.model --workers 2

Reads `--seconds` of batches from `build_train_data` (sources read from disk, tokenized, packed, shuffled and put
onto the local devices) and prints tokens/s. Then it replays the demo: each "step" takes as long as the demo's train
step (batch x seq_len / 1,900 tokens/s, README), and it measures how long the step waits for its next batch: with
the prefetch that overlaps the step, close to zero.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DEMO_TOKENS_PER_S = 1900  # experiments/configs/shakespeare.yaml trained on this 2-core CPU (README quick start)
WORDS = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()


def make_corpus(root: Path, files: int, docs: int) -> str:
    """`files` JSONL files of `docs` random-word documents each; returns their glob."""
    rng = np.random.default_rng(0)
    words = np.array(WORDS)
    root.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        lines = [json.dumps({"text": " ".join(words[rng.integers(0, len(words), rng.integers(50, 500))])})
                 for _ in range(docs)]
        (root / f"part-{f:04d}.jsonl").write_text("\n".join(lines) + "\n")
    return str(root / "*.jsonl")


def bench(corpus: str, tokenizer_path: str | None, seq_len: int, batch: int, streams: int, workers: int,
          seconds: float, work_dir: Path) -> dict[str, float]:
    from llama_jax.config import Config, DataConfig, DataSource, LlamaConfig, MeshConfig
    from llama_jax.data import build_train_data, provision_tokenizer
    from llama_jax.sharding import make_mesh

    data = DataConfig(sources=[DataSource(name=corpus)], seq_len=seq_len, streaming=True, streams=streams,
                      workers=workers, tokenizer=tokenizer_path, tokenizer_vocab_size=1024)
    cfg = Config(model=LlamaConfig.preset("tiny", max_seq_len=seq_len), data=data)
    tokenizer = provision_tokenizer(cfg, work_dir)
    mesh = make_mesh(MeshConfig())
    it = build_train_data(cfg, tokenizer, batch, mesh)
    start = time.perf_counter()
    next(it)
    first = time.perf_counter() - start
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokens += next(it)["tokens"].size
    rate = tokens / (time.perf_counter() - start)

    step = batch * seq_len / DEMO_TOKENS_PER_S
    waited, steps = 0.0, max(3, int(seconds / step))
    for _ in range(steps):
        time.sleep(step)  # the demo's train step runs on the devices meanwhile
        t = time.perf_counter()
        next(it)
        waited += time.perf_counter() - t
    it.close()
    return {"first_batch_s": first, "tokens_per_s": rate, "demo_step_s": step, "wait_per_step_s": waited / steps}


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", help="JSONL/text/parquet glob, hf:NAME or a TFDS name (default: generated)")
    parser.add_argument("--tokenizer", help="sentencepiece model (default: trained on the corpus)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0, help="grain worker processes (0: threads)")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--files", type=int, default=16, help="generated corpus: files")
    parser.add_argument("--docs", type=int, default=500, help="generated corpus: documents per file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = args.corpus or make_corpus(Path(tmp) / "corpus", args.files, args.docs)
        result = bench(corpus, args.tokenizer, args.seq_len, args.batch, args.streams, args.workers, args.seconds,
                       Path(tmp))
    print(f"pipeline: {result['tokens_per_s']:,.0f} tokens/s (first batch after {result['first_batch_s']:.2f} s), "
          f"{result['tokens_per_s'] / DEMO_TOKENS_PER_S:.0f}x the demo's {DEMO_TOKENS_PER_S:,} tokens/s")
    print(f"demo step {result['demo_step_s'] * 1e3:.0f} ms: waits {result['wait_per_step_s'] * 1e3:.2f} ms per step "
          "for its batch (prefetched while the step runs)")
    return result


if __name__ == "__main__":
    main()
