"""Peak memory of `convert` on a synthetic Meta checkpoint (random bf16 weights, written shard by shard).

Each step runs in its own process so its peak is its own: peak RSS (`ru_maxrss`, includes the checkpoint pages the
OS maps in for reading, which it can drop at will) and peak anonymous memory (sampled `RssAnon`: what the
conversion really holds). Defaults give a ~2.3 GB checkpoint: `python experiments/bench_convert.py`.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

FORMATS = ("hf", "meta", "orbax")


def _anon_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


def _measured(fn) -> dict[str, float]:
    """Run `fn`, sampling anonymous RSS every 20 ms; peaks in GiB and wall seconds."""
    peak, done = [_anon_kib()], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _anon_kib())
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    return dict(seconds=seconds, peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                peak_anon_gib=max(peak[0], _anon_kib()) / 2**20)


def write_synthetic(args: argparse.Namespace, path: Path) -> None:
    """A Meta checkpoint of random bf16 tensors, one rank's file at a time, through Meta's own split rules."""
    import torch

    from llama_jax.checkpoints.layout import meta_names, meta_shape
    from llama_jax.checkpoints.meta import meta_params, split_axis
    from llama_jax.config import LlamaConfig

    cfg = LlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=args.dim // 128 or 1, vocab_size=args.vocab,
                      multiple_of=min(256, args.dim))
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for rank in range(args.shards):
        shard = {}
        for name in meta_names(cfg):
            shape, axis = list(meta_shape(name, cfg)), split_axis(name)
            if axis is not None:
                shape[axis] //= args.shards
            shard[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        torch.save(shard, path / f"consolidated.{rank:02d}.pth")
        del shard
    (path / "params.json").write_text(json.dumps(meta_params(cfg)))


def child(args: argparse.Namespace) -> None:
    work = Path(args.workdir)
    if args.step == "write":
        stats = _measured(lambda: write_synthetic(args, work / "meta"))
    else:
        from llama_jax.checkpoints.convert import convert
        stats = _measured(lambda: convert(work / "meta", work / f"out-{args.step}", args.step, overwrite=True))
    print(json.dumps(stats))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/bench_convert")
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS), help="conversions to measure")
    p.add_argument("--step", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.step:
        return child(args)
    work = Path(args.workdir)
    shutil.rmtree(work / "meta", ignore_errors=True)
    base = [sys.executable, __file__, "--dim", str(args.dim), "--layers", str(args.layers), "--vocab",
            str(args.vocab), "--shards", str(args.shards), "--workdir", str(work)]
    print(f"{'step':8s} {'GiB on disk':>12s} {'seconds':>8s} {'peak RSS GiB':>13s} {'peak anon GiB':>14s}")
    for step in ("write", *args.formats):
        run = subprocess.run(base + ["--step", step], capture_output=True, text=True)
        if run.returncode:
            sys.exit(f"step {step} failed:\n{run.stderr}")
        stats = json.loads(run.stdout.strip().splitlines()[-1])
        out = work / ("meta" if step == "write" else f"out-{step}")
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**30
        print(f"{step:8s} {size:12.2f} {stats['seconds']:8.1f} {stats['peak_rss_gib']:13.2f} "
              f"{stats['peak_anon_gib']:14.2f}")


if __name__ == "__main__":
    main()
