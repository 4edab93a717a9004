"""Weight-only quantization report: bits per byte, parameter memory and batch-1 decode tokens/s per `execution.quant`.

Two models. The tiny_shakespeare one (tiny_ci.yaml's shape) is trained here for `--train-steps` steps (or pass
`--checkpoint` to a run directory you trained, e.g. the README demo's), then evaluated on the validation split with
quant none / int8 / int4: the bits-per-byte change is what quantization costs a trained model. A random model of a
bigger shape (`--big-preset`, default llama2-7b, with `--layers` layers) gives the memory and speed that matter at
scale. Decode tokens/s come from `bench_decode.bench` (prefill, then the jitted decode loop, batch 1);
`--llama2c PATH` / `--llama2c-runq PATH` add llama2.c's float `run` and int8 `runq` on our v0 / v2 exports of the
same random weights. Quick run: `python experiments/bench_quant.py --data-dir DIR --train-steps 200` (DIR holds
tiny_shakespeare). On a shared machine timings are noisy: compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import jax
from bench_decode import bench, bench_llama2c, random_model
from flax import nnx

from llama_jax.checkpoints import load_pretrained
from llama_jax.config import ExecutionConfig, LlamaConfig, load_config
from llama_jax.quant import parameter_bytes
from llama_jax.training.evaluate import evaluate_checkpoint
from llama_jax.training.loop import train

TINY_CI = Path(__file__).resolve().parent / "configs" / "tiny_ci.yaml"
MODES = ("none", "int8", "int4")


def train_tiny(data_dir: str, steps: int, run_dir: Path) -> Path:
    """tiny_ci.yaml trained for `steps` steps into `run_dir` (checkpoint at the end only)."""
    overrides = [f"data.data_dir={data_dir}", f"checkpoint.dir={run_dir}", f"train.steps={steps}",
                 f"checkpoint.every={steps}", "train.eval_every=0", "train.sample_tokens=0", "train.log_every=50"]
    train(load_config(TINY_CI, overrides))
    return run_dir


def decode_rate(cfg: LlamaConfig, execution: ExecutionConfig, args: argparse.Namespace) -> float:
    return bench(cfg, execution, 1, args.prompt_len, args.new_tokens, args.repeats)[0]["decode_tok_s"]


def tiny_rows(run: Path, args: argparse.Namespace) -> list[str]:
    rows, base_bpb = [], None
    for mode in MODES:
        quant = [f"execution.quant={mode}", f"execution.quant_group_size={args.group_size}"]
        result = evaluate_checkpoint(run, "tiny_shakespeare", data_dir=args.data_dir, seq_len=args.seq_len,
                                     batch_size=8, max_batches=args.eval_batches, overrides=quant)
        base_bpb = result.bits_per_byte if base_bpb is None else base_bpb
        model = load_pretrained(run, quant=mode, quant_group_size=args.group_size)
        rate = decode_rate(model.cfg, model.execution, args)
        rows.append(f"{'tiny_shakespeare':<18} {mode:<5} {parameter_bytes(nnx.state(model, nnx.Param)) / 2**20:>9.2f} "
                    f"{result.bits_per_byte:>10.4f} {result.bits_per_byte - base_bpb:>+9.4f} {rate:>11,.1f}")
    return rows


def big_rows(args: argparse.Namespace) -> list[str]:
    cfg = LlamaConfig.preset(args.big_preset, n_layers=args.layers)
    rows = []
    for mode in MODES:
        execution = ExecutionConfig(quant=mode, quant_group_size=args.group_size)
        model = random_model(cfg, execution)
        line = (f"{args.big_preset + f' x{args.layers}L':<18} {mode:<5} "
                f"{parameter_bytes(nnx.state(model, nnx.Param)) / 2**20:>9.1f} {'':>10} {'':>9} "
                f"{decode_rate(cfg, execution, args):>11,.1f}")
        if mode == "none":
            for flag, binary, version in (("run", args.llama2c, 0), ("runq", args.llama2c_runq, 2)):
                if binary:
                    rate = bench_llama2c(binary, model, args.prompt_len, args.new_tokens, version)
                    line += f"  llama2.c {flag} {rate:,.1f} tok/s"
        rows.append(line)
        del model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="TFDS data_dir holding tiny_shakespeare (default: TFDS's own)")
    parser.add_argument("--checkpoint", help="a trained tiny_shakespeare run/checkpoint instead of training one here")
    parser.add_argument("--train-steps", type=int, default=200, help="steps of tiny_ci.yaml when training here")
    parser.add_argument("--eval-batches", type=int, default=16, help="validation batches of 8 x seq-len tokens")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per evaluated window")
    parser.add_argument("--group-size", type=int, default=64, help="int4: input features per scale")
    parser.add_argument("--big-preset", default="llama2-7b", help="the bigger random shape (a LlamaConfig preset)")
    parser.add_argument("--layers", type=int, default=1, help="layers of the bigger shape")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16, help="decoded tokens per timing (>= 2)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs after the compiling one (best is kept)")
    parser.add_argument("--llama2c", metavar="PATH", help="also time llama2.c's float `run` on the bigger shape")
    parser.add_argument("--llama2c-runq", metavar="PATH", help="also time llama2.c's int8 `runq` on the bigger shape")
    args = parser.parse_args()

    print(f"{jax.devices()[0].device_kind} ({jax.default_backend()}), float32 compute, int4 groups of "
          f"{args.group_size}; decode: batch 1, prompt {args.prompt_len}, {args.new_tokens} new tokens")
    header = f"{'model':<18} {'quant':<5} {'params MiB':>9} {'bits/byte':>10} {'delta':>9} {'decode tok/s':>11}"
    print(header + "\n" + "-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.checkpoint) if args.checkpoint else train_tiny(args.data_dir, args.train_steps,
                                                                       Path(tmp) / "tiny")
        for row in tiny_rows(run, args):
            print(row, flush=True)
    for row in big_rows(args):
        print(row, flush=True)


if __name__ == "__main__":
    main()
