"""Rejection sampling (Llama 2 paper section 3.2.3): K samples per prompt, keep the best, fine-tune on the best.

Sample k of every prompt is drawn at `temperatures[k % len(temperatures)]` (the paper found the best temperature
moves up to ~1.2-1.3 after RLHF, so a schedule over several is useful) with the batched KV-cache sampler, each scored
by the reward callable. The best sample per prompt competes with the best of earlier rounds (`pool`, their output
files: the paper pooled all earlier rounds from its third one), and the winners are written as SFT JSONL (the
`messages` / `prompt`+`completion` shapes `llama_jax.data.sft` reads, with their `reward`), then fine-tuned on.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from llama_jax.alignment.rollout import Prompt, RewardFn, Sampler, completion_texts, load_reward, read_prompts
from llama_jax.checkpoints import load_pretrained
from llama_jax.config import Config, ConfigError, RejectionConfig
from llama_jax.data.records import read_records
from llama_jax.distributed import initialize
from llama_jax.inference.sampling import Sampling
from llama_jax.model import Llama
from llama_jax.paths import as_path
from llama_jax.sharding import make_mesh
from llama_jax.tokenizer import Tokenizer
from llama_jax.training.finetune import finetune, stage_tokenizer
from llama_jax.training.loop import TrainResult


@dataclass
class Samples:
    """`texts[i][k]` and `rewards[i, k]`: sample k of prompt i and its reward."""

    texts: list[list[str]]
    rewards: np.ndarray

    def best(self) -> np.ndarray:
        return np.argmax(self.rewards, axis=1)


@dataclass
class RejectionResult:
    output: str
    mean_reward: float  # over all K samples of every prompt
    best_reward: float  # mean over prompts of the kept sample's reward (after pooling)
    pooled: int  # prompts whose kept sample came from an earlier round
    samples: Samples | None = None
    finetuned: TrainResult | None = None

    def report(self) -> str:
        lines = [f"rejection sampling: {self.output}: mean reward of the samples {self.mean_reward:.4f}, of the kept "
                 f"best {self.best_reward:.4f} ({self.pooled} kept from earlier rounds)"]
        if self.finetuned is not None:
            lines.append(self.finetuned.report())
        return "\n".join(lines)


def draw_samples(model: Llama, tokenizer: Tokenizer, prompts: list[Prompt], reward_fn: RewardFn,
                 cfg: RejectionConfig, seed: int = 0) -> Samples:
    """`cfg.samples` completions per prompt (sample k at `temperatures[k % len]`), in batches of `cfg.batch_size`
    rows of one temperature, each scored by `reward_fn`. A prompt's samples share a batch where they fit, so its
    keys and values are computed once (`generate.distinct_prompts`)."""
    k_total = cfg.samples
    texts: list[list[str]] = [[""] * k_total for _ in prompts]
    rewards = np.zeros((len(prompts), k_total), np.float32)
    sampler = Sampler(gather=False)
    for t_index, temperature in enumerate(dict.fromkeys(cfg.temperatures)):
        rows = [(i, k) for i in range(len(prompts)) for k in range(k_total)
                if cfg.temperatures[k % len(cfg.temperatures)] == temperature]
        for first in range(0, len(rows), cfg.batch_size):
            chunk = rows[first:first + cfg.batch_size]
            rollout = sampler(model, [prompts[i].ids for i, _ in chunk], cfg.max_new_tokens,
                              Sampling(float(temperature)), tokenizer.eos_id, seed * 100_003 + t_index * 10_007 + first)
            scores = np.asarray(reward_fn(rollout.prompts, rollout.completions, rollout.mask), np.float32)
            for (i, k), text, score in zip(chunk, completion_texts(tokenizer, rollout), scores, strict=True):
                texts[i][k], rewards[i, k] = text, score
    return Samples(texts, rewards)


def _key(record: dict[str, Any]) -> str:
    """What identifies a record's prompt: its messages before the reply, or its prompt text."""
    prompt = record["messages"][:-1] if "messages" in record else record["prompt"]
    return json.dumps(prompt, sort_keys=True)


def read_pool(files: list[str]) -> dict[str, dict[str, Any]]:
    """The best record per prompt over earlier rounds' output files (records carrying a `reward`)."""
    def encode(record: Any, _: bool) -> tuple[dict[str, Any], None]:
        if not isinstance(record, dict) or not isinstance(record.get("reward"), (int, float)):
            raise ValueError("a pooled record needs a numeric 'reward' (write pools with rejection sampling)")
        return record, None
    return read_pool_records([r for spec in files for r in read_records(spec, encode, "fail", "rejection.pool")[0]])


def read_pool_records(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The highest-reward record per prompt."""
    best: dict[str, dict[str, Any]] = {}
    for record in records:
        key = _key(record)
        if key not in best or record["reward"] > best[key]["reward"]:
            best[key] = record
    return best


def select_best(prompts: list[Prompt], samples: Samples, pool: dict[str, dict[str, Any]]
                ) -> tuple[list[dict[str, Any]], int]:
    """Per prompt, its best non-empty sample as an SFT record with its reward, or the pooled record if that scored
    higher (a prompt with neither is left out: an empty reply is not a fine-tuning example); and how many came from
    the pool."""
    records, pooled = [], 0
    rewards = np.where([[bool(t.strip()) for t in row] for row in samples.texts], samples.rewards, -np.inf)
    for i, k in enumerate(np.argmax(rewards, axis=1)):
        record = {**prompts[i].record(samples.texts[i][k]), "reward": float(samples.rewards[i, k])}
        earlier = pool.get(_key(record))
        if earlier is not None and (earlier["reward"] > record["reward"] or not np.isfinite(rewards[i, k])):
            record, pooled = earlier, pooled + 1
        elif not np.isfinite(rewards[i, k]):
            continue
        records.append(record)
    return records, pooled


def rejection_sampling(cfg: Config, reward_fn: RewardFn | None = None) -> RejectionResult:
    """Sample, keep the best, write `rejection.output` and (with `rejection.finetune`) fine-tune `init_from` on it
    with the `finetune` section's settings; the fine-tuning run goes to `checkpoint.dir`."""
    r = cfg.rejection
    if not r.init_from or not r.prompts or not r.output:
        raise ConfigError("rejection.init_from, rejection.prompts and rejection.output must all be set (the policy, "
                          "JSONL prompts, and the JSONL file to write)")
    initialize(cfg.train)
    cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, init_from=r.init_from, train=r.output))
    tokenizer = stage_tokenizer(cfg)
    mesh = make_mesh(cfg.mesh)
    model = load_pretrained(r.init_from, mesh, cfg.execution)
    reward_fn = reward_fn or load_reward(r.reward, tokenizer, mesh)
    prompts = read_prompts(r.prompts, tokenizer)
    samples = draw_samples(model, tokenizer, prompts, reward_fn, r, cfg.train.seed)
    records, pooled = select_best(prompts, samples, read_pool(r.pool))
    output = as_path(r.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("".join(json.dumps(record) + "\n" for record in records))
    result = RejectionResult(str(output), float(samples.rewards.mean()),
                             float(np.mean([rec["reward"] for rec in records])), pooled, samples)
    if r.finetune:
        del model
        result.finetuned = finetune(cfg)
    return result
