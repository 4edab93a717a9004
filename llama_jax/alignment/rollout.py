"""RLHF rollouts: prompts -> completions sampled by the jitted KV-cache decoder from the parameters being trained.

The policy's own sharded arrays are sampled from (no host copy). With `gather=True` they are first all-gathered
over the data/fsdp axes into a device-side copy, once per rollout, so the decode loop does not re-gather every
weight at every step: the Llama 2 paper's generation under FSDP was ~20x slower until it gathered the weights.
Also here: reading prompt files and turning a `reward` setting into a reward callable, shared by PPO and rejection
sampling.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax.chat import encode_dialog
from llama_jax.config import ConfigError
from llama_jax.data.records import read_records
from llama_jax.inference.generate import MIN_PROMPT_BUCKET, PAD, bucket, decode, left_pad
from llama_jax.inference.sampling import Sampling
from llama_jax.model import Llama
from llama_jax.tokenizer import Tokenizer

RewardFn = Callable[[np.ndarray, np.ndarray, np.ndarray], Any]
"""`reward_fn(prompt_tokens [B, P] left-padded with PAD = -1, completion_tokens [B, N] PAD after the end,
completion_mask [B, N]) -> [B]` scores (a true reward or a reward model's)."""

REPLICATED_AXES = ("data", "fsdp")


@dataclass
class Prompt:
    """One prompt: its token ids and the record it came from (`messages` ending with a user turn, or `prompt`)."""

    ids: list[int]
    messages: list[dict[str, str]] | None = None
    text: str | None = None

    def record(self, completion: str) -> dict[str, Any]:
        """An SFT record (the shapes `llama_jax.data.sft` reads) answering this prompt with `completion`."""
        if self.messages is not None:
            return {"messages": [*self.messages, {"role": "assistant", "content": completion}]}
        return {"prompt": self.text, "completion": completion}


def read_prompts(spec: str, tokenizer: Tokenizer, setting: str = "ppo.prompts") -> list[Prompt]:
    """Prompts from JSONL files (comma-separated paths or globs): `{"messages": [...]}` ending with a user turn
    (Llama-2-chat encoding) or `{"prompt": "..."}` (BOS + text); a bad record fails naming its file and line."""
    def encode(record: Any, _: bool) -> tuple[Prompt, None]:
        if isinstance(record, dict) and isinstance(record.get("messages"), list):
            messages = list(record["messages"])
            return Prompt(encode_dialog(tokenizer, messages), messages=messages), None
        if isinstance(record, dict) and isinstance(record.get("prompt"), str):
            return Prompt(tokenizer.encode(record["prompt"], bos=True), text=record["prompt"]), None
        raise ValueError("a prompt record needs 'messages' (ending with a user turn) or 'prompt' text")
    return read_records(spec, encode, "fail", setting)[0]


def load_reward(spec: str, tokenizer: Tokenizer, mesh: Any = None) -> RewardFn:
    """The reward callable a config names: `module:factory` (imported; `factory(tokenizer)` returns the callable,
    e.g. a synthetic task's true reward) or a reward-model directory (`llama_jax.alignment.reward`)."""
    if not spec:
        raise ConfigError("no reward given; set ppo.reward / rejection.reward to a reward-model directory or "
                          "module:factory")
    if ":" in spec and "/" not in spec.split(":", 1)[0]:
        module, name = spec.split(":", 1)
        try:
            factory = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"reward '{spec}' cannot be imported ({err}); give module:factory") from None
        return factory(tokenizer)
    from llama_jax.alignment.reward import RewardModel
    return reward_model_fn(RewardModel.load(spec, mesh))


def reward_model_fn(model: Any) -> RewardFn:
    """A `RewardFn` of a `reward.RewardModel`: its scores squashed to (0, 1) by a sigmoid (the scale the paper's
    `logit` and safety threshold assume; `logit` of them gives back the raw score)."""
    def score(prompts: np.ndarray, completions: np.ndarray, mask: np.ndarray) -> np.ndarray:
        prompt_ids = [[int(t) for t in row if t != PAD] for row in prompts]
        completion_ids = [[int(t) for t, keep in zip(row, kept) if keep] for row, kept in zip(completions, mask)]
        return np.asarray(jax.nn.sigmoid(model.score(prompt_ids, completion_ids)))
    return score


@dataclass
class Rollout:
    """A batch of sampled completions: `prompts` `[B, P]` left-padded with PAD, `completions` `[B, N]` (PAD after
    a row's EOS or its last allowed token), their sampling log-probabilities `logprobs` (0 at PAD) and how long
    sampling took."""

    prompts: np.ndarray
    completions: np.ndarray
    logprobs: np.ndarray
    seconds: float

    @property
    def mask(self) -> np.ndarray:
        """`[B, N]` float32: 1 on generated tokens (EOS included)."""
        return (self.completions != PAD).astype(np.float32)

    @property
    def tokens_per_s(self) -> float:
        return float(self.mask.sum()) / max(self.seconds, 1e-9)

    def sequences(self) -> dict[str, np.ndarray]:
        """Teacher-forcing inputs over prompt + completion, `[B, P + N - 1]` each: `tokens`, `targets`, `positions`
        (from 0 at each prompt's first token), `segment_ids` (1 on real tokens, 0 on padding so it is never
        attended to) and `mask` (1 where the target is a generated token)."""
        full = np.concatenate([self.prompts, self.completions], axis=1)
        real = full != PAD
        tokens = np.where(real, full, 0).astype(np.int32)
        positions = np.maximum(np.cumsum(real, axis=1) - 1, 0).astype(np.int32)
        completion = np.concatenate([np.zeros_like(self.prompts, np.float32), self.mask], axis=1)
        return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions[:, :-1],
                "segment_ids": real[:, :-1].astype(np.int32), "mask": completion[:, 1:]}


def _gathered_spec(spec: PartitionSpec) -> PartitionSpec:
    def keep(entry: Any) -> Any:
        axes = tuple(a for a in (entry if isinstance(entry, tuple) else (entry,)) if a not in REPLICATED_AXES)
        return None if not axes else axes[0] if len(axes) == 1 else axes
    return PartitionSpec(*(keep(e) for e in spec))


class Sampler:
    """Samples rollouts from a model's live parameters, gathering them over data/fsdp once per call if asked."""

    def __init__(self, gather: bool = True):
        self.gather = gather
        self._gather_fn: Any = None

    def gathered(self, model: Llama) -> Llama:
        """`model` with its weights all-gathered over data/fsdp (tensor sharding kept), as a device-side copy."""
        graphdef, state = nnx.split(model)
        if self._gather_fn is None:
            shardings = jax.tree.map(lambda x: NamedSharding(x.sharding.mesh, _gathered_spec(x.sharding.spec))
                                     if isinstance(x.sharding, NamedSharding) else x.sharding, state)
            self._gather_fn = jax.jit(lambda s: s, out_shardings=shardings)
        return nnx.merge(graphdef, self._gather_fn(state))

    def __call__(self, model: Llama, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling,
                 eos_id: int, seed: int) -> Rollout:
        start = time.perf_counter()
        source = self.gathered(model) if self.gather else model
        state = decode(source, prompt_ids, max_new_tokens, sampling, eos_id, seed)
        completions, logprobs = jax.device_get((state.out, state.logp))
        seconds = time.perf_counter() - start
        tokens, pad = left_pad(prompt_ids, bucket(max(len(p) for p in prompt_ids), MIN_PROMPT_BUCKET))
        prompts = np.where(np.arange(tokens.shape[1])[None, :] >= pad[:, None], tokens, PAD).astype(np.int32)
        return Rollout(prompts, np.asarray(completions), np.asarray(logprobs), seconds)


def completion_texts(tokenizer: Tokenizer, rollout: Rollout) -> list[str]:
    """Each row's completion as text (EOS and padding dropped)."""
    return [tokenizer.decode([int(t) for t in row if t != PAD and t != tokenizer.eos_id]).strip()
            for row in rollout.completions]
