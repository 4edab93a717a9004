"""Reward models (Llama 2 §3.2.2): the LLaMA backbone with a scalar head read at the last token of a dialog.

The head is a `[dim]` weight attached to a `Llama` as `reward_head` (so the training loop, sharding, checkpoints and
resume treat it as one more parameter); the reward of a sequence is the final-norm hidden state of its last real
token dotted with it. It starts at zero (every reward 0, loss log 2 without margin) and is trained with the binary
ranking loss with margin `-log σ(r_chosen − r_rejected − m(rating))` on preference pairs from `finetune.init_from`
(any checkpoint: a chat/SFT model, as the paper does). Held-out accuracy is reported per rating level.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from llama_jax.alignment.preferences import (
    RATINGS,
    UNRATED,
    Pair,
    build_preference_data,
    level_name,
    on_both_sides,
    pair_rows,
    preference_metrics,
    prompt_dialog,
    read_pairs,
    sequence_rows,
)
from llama_jax.alignment.rewards_math import margins, ranking_loss
from llama_jax.alignment.sequences import per_sequence
from llama_jax.chat import encode_turns
from llama_jax.checkpoints.orbax_format import read_stored, restore_params
from llama_jax.config import Config, ConfigError, ExecutionConfig
from llama_jax.data.records import read_records
from llama_jax.lora import LoRAParam
from llama_jax.model import Constant, Llama
from llama_jax.paths import PathLike, as_path
from llama_jax.tokenizer import Tokenizer
from llama_jax.training.finetune import _tokenizer, epochs_to_steps, run_stage
from llama_jax.training.loop import TrainResult, run_training
from llama_jax.training.step import Batch, Objective, Trainer

EVAL_JSON = "reward_eval.json"


class RewardHead(LoRAParam):
    """The scalar head: a new weight, trained even when LoRA freezes the backbone (hence a LoRAParam)."""


def attach_reward_head(model: Llama) -> Llama:
    """Give `model` a zero `[dim]` reward head, in place (the `Objective.attach` of reward training)."""
    init = Constant(0.0)
    model.reward_head = RewardHead(init(None, (model.cfg.dim,), jnp.float32), axes=("embed",), init=init)
    return model


def sequence_rewards(model: Llama, ids: jax.Array, length: jax.Array) -> jax.Array:
    """`[B]` float32 rewards of right-padded `[B, T]` sequences, read at each one's last real token."""
    features, _ = model.features(ids)
    last = jnp.take_along_axis(features, (length - 1)[:, None, None], axis=1)[:, 0]
    return jnp.einsum("BD,D->B", last.astype(jnp.float32), model.reward_head[...])


def reward_objective(margin_table: str) -> Objective:
    """Ranking loss with the margins of `margin_table` ("none", "small", "large"); per-pair metrics: accuracy
    (chosen scored higher), mean chosen / rejected rewards and their margin."""
    margins(margin_table, jnp.zeros((1,), jnp.int32))  # an unknown table fails here, before any compilation

    def loss(model: Llama, batch: Batch) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        chosen, rejected = on_both_sides(functools.partial(sequence_rewards, model), batch, "ids", "length")
        losses = ranking_loss(chosen, rejected, margins(margin_table, batch["level"]))
        return jnp.sum(losses), jnp.float32(losses.size), preference_metrics(chosen, rejected)

    return Objective(loss, attach_reward_head)


def rewards_of_rows(model: Llama, rows: dict[str, jax.Array]) -> jax.Array:
    return sequence_rewards(model, rows["ids"], rows["length"])


class RewardModel:
    """A trained reward model for scoring (rejection sampling, PPO, evaluation)."""

    def __init__(self, model: Llama, mesh: Mesh | None = None):
        if not isinstance(getattr(model, "reward_head", None), RewardHead):
            raise ValueError("this model has no reward head; load a reward-model run with RewardModel.load")
        self.model, self.mesh = model, mesh

    @classmethod
    def load(cls, path: PathLike, mesh: Mesh | None = None, dtype: str | None = None) -> RewardModel:
        """The reward model in a reward-training run directory (its newest step) or one of its step directories."""
        stored = read_stored(path)
        execution = ExecutionConfig(param_dtype=dtype or stored.param_dtype, dtype=dtype or "float32",
                                    scan_layers=stored.scan_layers)
        try:
            graphdef, params = restore_params(path, execution, mesh, attach=attach_reward_head)
        except ValueError as err:
            raise ValueError(f"'{path}' holds no reward model ({err}); give a run of `align reward`") from None
        return cls(nnx.merge(graphdef, params), mesh)

    def score(self, prompts_tokens: Sequence[Sequence[int]], completions_tokens: Sequence[Sequence[int]]) -> jax.Array:
        """`[N]` float32 rewards of each prompt (ids, e.g. `encode_dialog`) followed by its completion (ids, EOS
        included or not), in jitted batches (`sequences.per_sequence`). Apply `jax.nn.sigmoid` for the (0, 1)
        scores `rewards_math.combine_rewards` expects."""
        rows = sequence_rows(prompts_tokens, completions_tokens)
        return jnp.asarray(per_sequence(rewards_of_rows, self.model, rows, self.mesh))

    def pair_accuracy(self, pairs: Sequence[Pair]) -> dict[str, float]:
        """Held-out accuracy (chosen scored above rejected) overall and per rating level, with pair counts."""
        none = [[] for _ in pairs]
        chosen = np.asarray(self.score(none, [p.chosen[0] for p in pairs]))
        rejected = np.asarray(self.score(none, [p.rejected[0] for p in pairs]))
        return accuracy_by_level(chosen, rejected, np.array([p.level for p in pairs]))


def accuracy_by_level(chosen: np.ndarray, rejected: np.ndarray, levels: np.ndarray) -> dict[str, float]:
    """`accuracy`, `accuracy/<rating>` and `pairs/<rating>` for every rating level present."""
    correct = chosen > rejected
    out = {"accuracy": float(np.mean(correct)), "pairs": float(len(correct))}
    for level in [*range(len(RATINGS)), UNRATED]:
        hit = levels == level
        if hit.any():
            out[f"accuracy/{level_name(level)}"] = float(np.mean(correct[hit]))
            out[f"pairs/{level_name(level)}"] = float(hit.sum())
    return out


@dataclass
class RewardResult:
    training: TrainResult
    heldout: dict[str, float] | None

    def report(self) -> str:
        lines = [self.training.report()]
        if self.heldout is not None:
            lines.append("held-out pairs: " + " ".join(f"{k} {v:.4g}" for k, v in self.heldout.items()))
        return "\n".join(lines)


def train_reward_model(cfg: Config) -> RewardResult:
    """Train (or resume) a reward model on the pairs in `finetune.train` from `finetune.init_from`, then measure
    its accuracy per rating level on `finetune.validation` (written to `<run>/reward_eval.json` too)."""
    return run_stage(cfg, _train_reward)


def _train_reward(cfg: Config, mesh: Mesh, tokenizer: Tokenizer) -> RewardResult:
    if cfg.lora.rank > 0:
        raise ConfigError("reward models train every weight here (lora.rank=0), as the Llama 2 paper's do")
    pairs, issues = read_pairs(cfg.finetune.train, tokenizer, cfg.data.seq_len, cfg.finetune.bad_records)
    data = build_preference_data(cfg, tokenizer, mesh, pair_rows(pairs, cfg.data.seq_len), issues, "reward")
    epochs_to_steps(cfg, data.steps_per_epoch)
    trainer = Trainer(cfg, mesh, reward_objective(cfg.reward.margin))
    result = run_training(cfg, trainer, data.train, None, tokenizer, cfg.finetune.init_from)
    heldout = None
    if cfg.finetune.validation and result.state is not None:
        held, _ = read_pairs(cfg.finetune.validation, tokenizer, cfg.data.seq_len, cfg.finetune.bad_records,
                             "finetune.validation")
        heldout = RewardModel(trainer.model(result.state.params), mesh).pair_accuracy(held)
        if jax.process_index() == 0:
            (as_path(cfg.checkpoint.dir) / EVAL_JSON).write_text(json.dumps(heldout, indent=2))
    return RewardResult(result, heldout)


@dataclass
class ScoreResult:
    output: str
    rewards: np.ndarray

    def report(self) -> str:
        return f"scored {len(self.rewards)} completions (mean reward {self.rewards.mean():.4f}) into {self.output}"


def _completion_record(record: Any, tokenizer: Tokenizer) -> tuple[tuple[Any, list[int], list[int]], None]:
    """(record, prompt ids, completion ids) encoded as `encode_turns` lays out the dialog with its reply."""
    if not isinstance(record, dict) or not isinstance(record.get("completion"), str):
        raise ValueError("a record needs a 'completion' string and a 'prompt' or 'messages'")
    dialog = [*prompt_dialog(record), {"role": "assistant", "content": record["completion"]}]
    ids, learn = encode_turns(tokenizer, dialog, "assistant", last_turn_only=True)
    start = learn.index(True)
    return (record, ids[:start], ids[start:]), None


def score_file(cfg: Config) -> ScoreResult:
    """Score the `{"prompt" | "messages", "completion"}` records of `reward.score_input` with the reward model at
    `reward.checkpoint` (default `checkpoint.dir`); write them with a `reward` field to `reward.score_output`."""
    rc = cfg.reward
    if not rc.score_input or not rc.score_output:
        raise ConfigError("set reward.score_input (JSONL of prompt/messages + completion) and reward.score_output")
    checkpoint = rc.checkpoint or cfg.checkpoint.dir
    if cfg.finetune.init_from is None and cfg.data.tokenizer is None:
        cfg.finetune.init_from = checkpoint
    tokenizer = _tokenizer(cfg)
    items, _ = read_records(rc.score_input, lambda r, _: _completion_record(r, tokenizer), cfg.finetune.bad_records,
                            "reward.score_input")
    rewards = np.asarray(RewardModel.load(checkpoint).score([p for _, p, _ in items], [c for _, _, c in items]))
    output = as_path(rc.score_output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("".join(json.dumps({**r, "reward": float(x)}) + "\n" for (r, _, _), x in zip(items, rewards)))
    return ScoreResult(str(output), rewards)
