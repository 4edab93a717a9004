"""Worked RLHF example on a task with a computable true reward (`rlhf_task.py`): reward model, then DPO, rejection
sampling and PPO (stages plug into `STAGES`), each measured against the same SFT policy.

(1) A tiny SFT policy is trained offline from a random init on chat replies of uniformly drawn words (the
`sft_example.py` helpers). (2) It samples two replies per prompt with the batched KV-cache sampler; pairs are
labelled by the true reward with rating levels and label noise. (3) A reward model is trained on them from the SFT
checkpoint (held-out accuracy per rating level). (4) DPO starts from the SFT policy; the true reward, the reward
model's score and the KL to the SFT policy are measured on fresh samples before and after. (5) Rejection sampling
draws K replies per prompt from the SFT policy, keeps the one the reward model scores best and fine-tunes the SFT
policy on them. (6) PPO trains the SFT policy against the reward model with a KL penalty to it.

    python experiments/rlhf_example.py --out runs/rlhf_example            # the README numbers
    python experiments/rlhf_example.py --out /tmp/rlhf --scale 0.3        # a shortened run
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import rlhf_task
from llama_jax.alignment.dpo import train_dpo
from llama_jax.alignment.ppo import ppo
from llama_jax.alignment.rejection import rejection_sampling
from llama_jax.alignment.reward import RewardModel, train_reward_model
from llama_jax.alignment.rollout import reward_model_fn
from llama_jax.alignment.sequences import sequence_logps
from llama_jax.chat import encode_dialog
from llama_jax.checkpoints import load_pretrained
from llama_jax.config import Config, LlamaConfig
from llama_jax.inference.generate import generate
from llama_jax.model import Llama
from llama_jax.tokenizer import Tokenizer
from sft_example import chat_corpus, finetune_run, random_base, write_jsonl

CONFIGS = Path(__file__).resolve().parent / "configs"
MODEL = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=384, multiple_of=32, max_seq_len=64)
MAX_NEW = 12  # six words and EOS take 7 tokens with this tokenizer
KL_BOUND = 3.0  # nats per reply (~0.4 per token): room for a target-word share near 0.7, where uniform is 0.25


@dataclass
class Context:
    """What every stage shares: the run directory, the tokenizer, the SFT policy and the labelled pairs."""

    out: Path
    scale: float
    tokenizer: Tokenizer
    sft: Path  # the SFT policy's run directory (also every stage's reference model)
    eval_prompts: list[str]
    kl_bound: float = KL_BOUND  # nats per reply: PPO's max_kl (its KL target half of it); every stage is checked
    pairs: dict[str, str] = field(default_factory=dict)  # split -> preference JSONL path
    reward_model: RewardModel | None = None  # set by the "rm" stage
    samples: dict[str, Samples] = field(default_factory=dict)  # each measured policy's evaluation samples
    results: dict[str, float] = field(default_factory=dict)

    def train(self, name: str, stage: Callable[[Config], Any], epochs: float) -> tuple[float, Any]:
        """Run `stage` from the SFT policy on the pairs into `out/name` with `configs/<name>_rlhf_example.yaml`."""
        return finetune_run(self.out, name, str(self.sft), self.pairs["train"], self.pairs["valid"], epochs,
                            config=CONFIGS / f"{name}_rlhf_example.yaml", stage=stage)


@dataclass
class Samples:
    prompts: list[list[int]]  # Llama-2-chat prompt ids
    replies: list[list[int]]  # sampled ids, EOS included when the reply ended
    texts: list[str]


def sample(model: Llama, tokenizer: Tokenizer, prompt_texts: list[str], seed: int,
           temperature: float = 1.0) -> Samples:
    """One reply per prompt (Llama-2-chat prompt, batched KV-cache sampling); texts decoded without EOS."""
    prompts = [encode_dialog(tokenizer, [{"role": "user", "content": p}]) for p in prompt_texts]
    replies = generate(model, prompts, max_new_tokens=MAX_NEW, temperature=temperature, eos_id=tokenizer.eos_id,
                       seed=seed)
    texts = [tokenizer.decode([t for t in reply if t != tokenizer.eos_id]).strip() for reply in replies]
    return Samples(prompts, replies, texts)


def mean_true_reward(texts: list[str]) -> float:
    return float(np.mean([rlhf_task.true_reward(t) for t in texts]))


def measure(ctx: Context, model: Llama, name: str, seed: int = 99) -> None:
    """Sample `model` on the evaluation prompts (temperature 1) and record, under `name/`: the mean true reward,
    the reward model's mean score (once trained) and the KL to the SFT policy, estimated on these samples as the
    mean of log π(y) − log π_sft(y) per sequence (`kl`) and per reply token (`kl_per_token`)."""
    samples = ctx.samples[name] = sample(model, ctx.tokenizer, ctx.eval_prompts, seed)
    ctx.results[f"{name}/true_reward"] = mean_true_reward(samples.texts)
    if ctx.reward_model is not None:
        ctx.results[f"{name}/rm_score"] = float(np.mean(ctx.reward_model.score(samples.prompts, samples.replies)))
    reference = load_pretrained(ctx.sft)
    kl = sequence_logps(model, samples.prompts, samples.replies) - \
        sequence_logps(reference, samples.prompts, samples.replies)
    ctx.results[f"{name}/kl"] = float(np.mean(kl))
    ctx.results[f"{name}/kl_below_bound"] = float(np.mean(kl) < ctx.kl_bound)
    ctx.results[f"{name}/kl_per_token"] = float(np.sum(kl) / sum(len(r) for r in samples.replies))


def build_policy(out: Path, scale: float, kl_bound: float = KL_BOUND) -> Context:
    """Stage 1: tokenizer, random init and the SFT policy fine-tuned from it (`out/sft`)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records = rlhf_task.sft_records(rng, max(600, int(2000 * scale)))
    tokenizer = random_base(out, MODEL, chat_corpus(records))
    data = write_jsonl(out / "sft.jsonl", records)
    finetune_run(out, "sft", str(out / "random"), data, None, max(2.0, 6 * scale), "train.eval_every=0",
                 config=CONFIGS / "sft_reverse.yaml")
    eval_prompts = rlhf_task.prompts(np.random.default_rng(1), max(64, int(128 * scale)))
    return Context(out, scale, tokenizer, out / "sft", eval_prompts, kl_bound)


def make_pairs(ctx: Context) -> None:
    """Stage 2: two samples per prompt from the SFT policy, labelled by the true reward; train / held-out split."""
    rng = np.random.default_rng(2)
    n = max(512, int(1024 * ctx.scale))
    prompt_texts = rlhf_task.prompts(rng, n)
    policy = load_pretrained(ctx.sft)
    first = sample(policy, ctx.tokenizer, prompt_texts, seed=10).texts
    second = sample(policy, ctx.tokenizer, prompt_texts, seed=11).texts
    pairs = rlhf_task.label_pairs(rng, prompt_texts, first, second)
    held = len(pairs) // 5
    ctx.pairs = {"train": write_jsonl(ctx.out / "pairs_train.jsonl", pairs[held:]),
                 "valid": write_jsonl(ctx.out / "pairs_valid.jsonl", pairs[:held])}
    ctx.results["pairs"] = len(pairs)
    measure(ctx, policy, "sft")


SEPARATED = ("significantly better", "better")  # pairs 2+ target words apart: never label-flipped


def train_rm(ctx: Context) -> None:
    """Stage 3: the reward model from the SFT checkpoint; held-out accuracy per rating level, and on the clearly
    separated pairs; then the SFT policy's samples are scored by it."""
    seconds, result = ctx.train("rm", train_reward_model, max(4.0, 10 * ctx.scale))
    held = result.heldout
    ctx.results |= {f"rm/{k}": v for k, v in held.items()}
    separated = [(held[f"accuracy/{r}"], held[f"pairs/{r}"]) for r in SEPARATED if f"pairs/{r}" in held]
    ctx.results["rm/accuracy_separated"] = sum(a * n for a, n in separated) / sum(n for _, n in separated)
    ctx.results["rm/seconds"] = seconds
    ctx.reward_model = RewardModel.load(ctx.out / "rm")
    sft = ctx.samples["sft"]
    ctx.results["sft/rm_score"] = float(np.mean(ctx.reward_model.score(sft.prompts, sft.replies)))


def train_dpo_stage(ctx: Context) -> None:
    """Stage 4: DPO from the SFT policy on the same pairs; the policy is measured as the SFT one was."""
    seconds, result = ctx.train("dpo", train_dpo, 1.0)  # 4 epochs at beta 1 overshot: 4.2 nats per reply
    ctx.results["dpo/seconds"] = seconds
    ctx.results["dpo/steps"] = result.training.step
    measure(ctx, load_pretrained(ctx.out / "dpo"), "dpo")


def online_prompts(ctx: Context) -> str:
    """The prompts rejection sampling and PPO sample from: chat prompts of the task, as JSONL."""
    texts = rlhf_task.prompts(np.random.default_rng(3), max(96, int(512 * ctx.scale)))
    return write_jsonl(ctx.out / "online_prompts.jsonl", [{"messages": [{"role": "user", "content": t}]}
                                                          for t in texts])


def online_stage(ctx: Context, name: str, stage: Callable[..., Any], *overrides: str) -> tuple[float, Any]:
    """Run `stage(config, reward)` from the SFT policy, rewarded by the trained reward model (sigmoid scores),
    with `configs/<name>_rlhf_example.yaml` into `out/name`."""
    prompts = online_prompts(ctx)
    reward = reward_model_fn(ctx.reward_model)
    return finetune_run(ctx.out, name, str(ctx.sft), str(ctx.out / f"{name}.jsonl"), None, max(2.0, 4 * ctx.scale),
                        f"{name}.init_from={ctx.sft}", f"{name}.prompts={prompts}", *overrides,
                        config=CONFIGS / f"{name}_rlhf_example.yaml", stage=lambda cfg: stage(cfg, reward))


def rejection_stage(ctx: Context) -> None:
    """Stage 5: best-of-K by the reward model, then the SFT policy fine-tuned on the kept replies; the true reward
    of the kept replies is compared with that of all K samples."""
    seconds, result = online_stage(ctx, "rejection", rejection_sampling,
                                   f"rejection.output={ctx.out / 'rejection.jsonl'}")
    texts = result.samples.texts
    kept = [row[k] for row, k in zip(texts, result.samples.best())]
    ctx.results["rejection/samples_true_reward"] = mean_true_reward([t for row in texts for t in row])
    ctx.results["rejection/best_of_k_true_reward"] = mean_true_reward(kept)
    ctx.results["rejection/seconds"] = seconds
    measure(ctx, load_pretrained(ctx.out / "rejection"), "rejection")


def ppo_stage(ctx: Context) -> None:
    """Stage 6: PPO against the reward model, its KL coefficient adapted towards half the KL bound and its updates
    stopped at the bound; rollout and training throughput of its last iteration, and its final KL coefficient."""
    iterations = max(16, int(60 * ctx.scale))
    seconds, result = online_stage(ctx, "ppo", ppo, f"ppo.iterations={iterations}", f"ppo.max_kl={ctx.kl_bound}",
                                   f"ppo.kl_target={ctx.kl_bound / 2}")
    ctx.results |= {f"ppo/{k}": result.metrics[k] for k in ("rollout_tokens_per_s", "train_tokens_per_s", "kl_coef")}
    ctx.results["ppo/seconds"] = seconds
    measure(ctx, result.policy, "ppo")


STAGES: dict[str, Callable[[Context], None]] = {"rm": train_rm, "dpo": train_dpo_stage, "rejection": rejection_stage,
                                                "ppo": ppo_stage}


def run(out: Path, scale: float = 1.0, stages: tuple[str, ...] = tuple(STAGES), kl_bound: float = KL_BOUND
        ) -> dict[str, float]:
    """Build the SFT policy and the pairs, run `stages` in order, and return every measured number."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    start = time.process_time()
    ctx = build_policy(out, scale, kl_bound)
    ctx.results["kl_bound"] = kl_bound
    make_pairs(ctx)
    ctx.results["sft/cpu_seconds"] = time.process_time() - start
    for name in stages:
        start = time.process_time()
        STAGES[name](ctx)
        ctx.results[f"{name}/cpu_seconds"] = time.process_time() - start  # all threads: wall time varies with load
    return ctx.results


def report(results: dict[str, float]) -> str:
    return "\n".join(f"{k:<36} {v:.4f}" if isinstance(v, float) else f"{k:<36} {v}" for k, v in results.items())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/rlhf_example", help="directory for data, tokenizer and runs")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the data and epochs (0.3 = quick)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run after the pairs")
    parser.add_argument("--kl-bound", type=float, default=KL_BOUND, help="KL to the SFT policy allowed, nats per reply")
    args = parser.parse_args()
    results = run(Path(args.out), args.scale, tuple(s for s in args.stages.split(",") if s), args.kl_bound)
    print(report(results))
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))
