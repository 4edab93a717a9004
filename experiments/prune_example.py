"""Pruning report: sparsity and validation bits per byte of a tiny model before pruning, after it, and after a
short recovery fine-tune that keeps the mask fixed.

A tiny LLaMA is pretrained on a local text file, then each variant prunes that checkpoint (`prune_checkpoint`, what
`python -m llama_jax prune` runs) and fine-tunes the result on the pretraining loop (`train.init_from` plus the same
`prune` section, so unstructured masks stay fixed; structured variants train their smaller model as is). All three
numbers come from the same held-out tail of the text.

    python experiments/prune_example.py --text play.txt --out runs/prune_example      # the README numbers
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from flax import nnx

from llama_jax.checkpoints import load_pretrained
from llama_jax.compression.masks import projection_sparsity
from llama_jax.compression.prune import prune_checkpoint
from llama_jax.config import Config, load_config
from llama_jax.data import build_validation_data
from llama_jax.sharding import make_mesh
from llama_jax.tokenizer import Tokenizer
from llama_jax.training.evaluate import evaluate
from llama_jax.training.loop import train

CONFIG = Path(__file__).resolve().parent / "configs" / "prune_example.yaml"
VARIANTS = {
    "none (control)": [],  # the dense model fine-tuned alike: how much of the recovery is just more training
    "magnitude 50% (per layer)": ["prune.method=magnitude", "prune.sparsity=0.5"],
    "magnitude 50% (global)": ["prune.method=magnitude", "prune.sparsity=0.5", "prune.scope=global"],
    "2:4": ["prune.method=2:4"],
    "FFN channels 50%": ["prune.method=structured", "prune.ffn_hidden_dim=176"],
    "FFN 50% + 1 of 2 KV groups": ["prune.method=structured", "prune.ffn_hidden_dim=176", "prune.n_kv_heads=1"],
}
SHAPE_OVERRIDES = ("ffn_hidden_dim", "n_heads", "n_kv_heads", "head_dim")


@dataclasses.dataclass
class Stage:
    sparsity: float
    params: int
    bits_per_byte: float


def measure(cfg: Config, checkpoint: Path) -> Stage:
    """Projection sparsity, parameter count and held-out bits per byte of the checkpoint at `checkpoint`."""
    mesh = make_mesh(cfg.mesh)
    model = load_pretrained(checkpoint, mesh)
    validation = build_validation_data(cfg, Tokenizer(cfg.data.tokenizer), mesh=mesh)
    params = nnx.state(model, nnx.Param)
    return Stage(projection_sparsity(params), model.cfg.num_params(),
                 evaluate(model, validation, mesh).bits_per_byte)


def run(text: Path, out: Path, pretrain_steps: int = 150, recovery_steps: int = 40,
        variants: tuple[str, ...] = tuple(VARIANTS)) -> tuple[Stage, dict[str, tuple[Stage, Stage]]]:
    """Pretrain, then prune and recover each variant; returns the dense stage and (pruned, recovered) per variant."""
    common = [f"data.sources=[{{name: {text}}}]", f"data.cache_dir={out / 'cache'}"]
    dense_dir = out / "dense"
    train(load_config(CONFIG, [*common, f"checkpoint.dir={dense_dir}", f"train.steps={pretrain_steps}"]))
    common.append(f"data.tokenizer={dense_dir / 'tokenizer.model'}")
    dense = measure(load_config(CONFIG, common), dense_dir)
    results = {}
    for name in variants:
        slug = "".join(c if c.isalnum() else "_" for c in name)
        cfg = load_config(CONFIG, [*common, *VARIANTS[name]])
        pruned_dir, pruned = dense_dir, dense
        if cfg.prune.method != "none":
            pruned_dir = prune_checkpoint(dense_dir, out / f"{slug}-pruned", cfg.prune, overwrite=True).path
            pruned = measure(cfg, pruned_dir)
        architecture = load_pretrained(pruned_dir).cfg
        recovery = [*common, *VARIANTS[name], f"train.init_from={pruned_dir}", f"checkpoint.dir={out / slug}",
                    f"train.steps={recovery_steps}", "optim.lr=1e-3", "optim.warmup_steps=2",
                    *[f"model.{k}={getattr(architecture, k)}" for k in SHAPE_OVERRIDES]]
        if cfg.prune.method == "structured":
            recovery.append("prune.method=none")  # the smaller model trains whole
        train(load_config(CONFIG, recovery))
        results[name] = (pruned, measure(cfg, out / slug))
    return dense, results


def report(dense: Stage, results: dict[str, tuple[Stage, Stage]]) -> str:
    lines = [f"dense: {dense.params:,} parameters, validation bits/byte {dense.bits_per_byte:.4f}",
             f"{'variant':<28} {'sparsity':>8} {'params':>9} {'bpb pruned':>10} {'bpb recovered':>13} "
             f"{'sparsity after':>14}"]
    for name, (pruned, recovered) in results.items():
        lines.append(f"{name:<28} {pruned.sparsity:>8.1%} {pruned.params:>9,} {pruned.bits_per_byte:>10.4f} "
                     f"{recovered.bits_per_byte:>13.4f} {recovered.sparsity:>14.1%}")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, required=True, help="a local .txt corpus (e.g. tiny shakespeare)")
    parser.add_argument("--out", type=Path, default=Path("runs/prune_example"), help="directory for the runs")
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--recovery-steps", type=int, default=40)
    args = parser.parse_args()
    print(report(*run(args.text, args.out, args.pretrain_steps, args.recovery_steps)))
