"""Worked RLHF example on a task with a computable true reward (`rlhf_task.py`): reward model, then DPO (other
stages plug into `STAGES`), each measured against the same SFT policy.

(1) A tiny SFT policy is trained offline from a random init on chat replies of uniformly drawn words (the
`sft_example.py` helpers). (2) It samples two replies per prompt with the batched KV-cache sampler; pairs are
labelled by the true reward with rating levels and label noise. (3) A reward model is trained on them from the SFT
checkpoint (held-out accuracy per rating level). (4) DPO starts from the SFT policy; the true reward, the reward
model's score and the KL to the SFT policy are measured on fresh samples before and after.

    python experiments/rlhf_example.py --out runs/rlhf_example            # the README numbers
    python experiments/rlhf_example.py --out /tmp/rlhf --scale 0.3        # a shortened run
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import rlhf_task
from llama_jax.chat import encode_dialog
from llama_jax.checkpoints import load_pretrained
from llama_jax.config import LlamaConfig
from llama_jax.inference.generate import generate
from llama_jax.model import Llama
from llama_jax.tokenizer import Tokenizer
from sft_example import chat_corpus, finetune_run, random_base, write_jsonl

CONFIGS = Path(__file__).resolve().parent / "configs"
MODEL = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=384, multiple_of=32, max_seq_len=64)
MAX_NEW = 12  # six words and EOS take 7 tokens with this tokenizer


@dataclass
class Context:
    """What every stage shares: the run directory, the tokenizer, the SFT policy and the labelled pairs."""

    out: Path
    scale: float
    tokenizer: Tokenizer
    sft: Path  # the SFT policy's run directory (also every stage's reference model)
    eval_prompts: list[str]
    pairs: dict[str, str] = field(default_factory=dict)  # split -> preference JSONL path
    results: dict[str, float] = field(default_factory=dict)


def sample(model: Llama, tokenizer: Tokenizer, prompt_texts: list[str], seed: int,
           temperature: float = 1.0) -> list[str]:
    """One reply per prompt (Llama-2-chat prompt, batched KV-cache sampling), decoded without EOS."""
    prompts = [encode_dialog(tokenizer, [{"role": "user", "content": p}]) for p in prompt_texts]
    replies = generate(model, prompts, max_new_tokens=MAX_NEW, temperature=temperature, eos_id=tokenizer.eos_id,
                       seed=seed)
    return [tokenizer.decode([t for t in reply if t != tokenizer.eos_id]).strip() for reply in replies]


def mean_true_reward(completions: list[str]) -> float:
    return float(np.mean([rlhf_task.true_reward(c) for c in completions]))


def build_policy(out: Path, scale: float) -> Context:
    """Stage 1: tokenizer, random init and the SFT policy fine-tuned from it (`out/sft`)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records = rlhf_task.sft_records(rng, max(400, int(2000 * scale)))
    tokenizer = random_base(out, MODEL, chat_corpus(records))
    data = write_jsonl(out / "sft.jsonl", records)
    finetune_run(out, "sft", str(out / "random"), data, None, max(2.0, 6 * scale), "train.eval_every=0",
                 config=CONFIGS / "sft_reverse.yaml")
    return Context(out, scale, tokenizer, out / "sft", rlhf_task.prompts(np.random.default_rng(1), 128))


def make_pairs(ctx: Context) -> None:
    """Stage 2: two samples per prompt from the SFT policy, labelled by the true reward; train / held-out split."""
    rng = np.random.default_rng(2)
    n = max(256, int(1024 * ctx.scale))
    prompt_texts = rlhf_task.prompts(rng, n)
    policy = load_pretrained(ctx.sft)
    first = sample(policy, ctx.tokenizer, prompt_texts, seed=10)
    second = sample(policy, ctx.tokenizer, prompt_texts, seed=11)
    pairs = rlhf_task.label_pairs(rng, prompt_texts, first, second)
    held = len(pairs) // 5
    ctx.pairs = {"train": write_jsonl(ctx.out / "pairs_train.jsonl", pairs[held:]),
                 "valid": write_jsonl(ctx.out / "pairs_valid.jsonl", pairs[:held])}
    ctx.results["pairs"] = len(pairs)
    ctx.results["sft/true_reward"] = mean_true_reward(sample(policy, ctx.tokenizer, ctx.eval_prompts, seed=99))


STAGES: dict[str, Callable[[Context], None]] = {}


def run(out: Path, scale: float = 1.0, stages: tuple[str, ...] = tuple(STAGES)) -> dict[str, float]:
    """Build the SFT policy and the pairs, run `stages` in order, and return every measured number."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    ctx = build_policy(out, scale)
    make_pairs(ctx)
    for name in stages:
        STAGES[name](ctx)
    return ctx.results


def report(results: dict[str, float]) -> str:
    return "\n".join(f"{k:<36} {v:.4f}" if isinstance(v, float) else f"{k:<36} {v}" for k, v in results.items())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/rlhf_example", help="directory for data, tokenizer and runs")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the data and epochs (0.3 = quick)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run after the pairs")
    args = parser.parse_args()
    results = run(Path(args.out), args.scale, tuple(s for s in args.stages.split(",") if s))
    print(report(results))
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))
