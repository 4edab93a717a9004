"""Preference pairs: JSONL records -> Llama-2-chat token sequences of the chosen and the rejected reply -> batches.

A record is `{"prompt": str | "messages": [...], "chosen": str, "rejected": str, "rating"?: str}` (TRL's
preference rows, plus the Llama 2 paper's rating). `messages` is a dialog ending with a user turn; a `prompt` is one
user turn. `chosen`/`rejected` are assistant replies (a string, or a one-message assistant list). `rating` is one of
`RATINGS` (or "negligibly better" / "unsure"); without one a pair gets no margin. Unusable records are reported with
file and line and follow `finetune.bad_records` (`llama_jax.data.records`).

Each side of a pair is the whole dialog with its reply, `encode_turns` exactly as SFT sees it, in `seq_len`
positions: `<side>_ids` (right-padded with 0), `<side>_learn` (1 on the reply's tokens and EOS) and
`<side>_length`; `level` is the rating's index (0 = significantly better ... 3 = negligibly better, -1 = unrated).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from llama_jax.chat import Message, encode_turns
from llama_jax.config import Config
from llama_jax.data.pipeline import DataIterator, fingerprint_of, process_slot
from llama_jax.data.records import RecordIssues, read_records
from llama_jax.data.sft import row_iterator
from llama_jax.data.tokenized import tokenizer_hash
from llama_jax.tokenizer import Tokenizer

RATINGS = ("significantly better", "better", "slightly better", "negligibly better / unsure")
RATING_ALIASES = {"negligibly better": 3, "unsure": 3}
UNRATED = -1
SIDES = ("chosen", "rejected")


def rating_level(rating: Any) -> int:
    """Index of `rating` in RATINGS (aliases accepted, case-insensitive); UNRATED when absent."""
    if rating is None:
        return UNRATED
    if not isinstance(rating, str):
        raise ValueError(f"'rating' must be a string, got {type(rating).__name__}")
    key = " ".join(rating.lower().split())
    levels = {r: i for i, r in enumerate(RATINGS)} | RATING_ALIASES
    if key not in levels:
        raise ValueError(f"'rating' {rating!r} is not one of {list(RATINGS)} (or 'negligibly better', 'unsure')")
    return levels[key]


def level_name(level: int) -> str:
    return RATINGS[level] if level >= 0 else "unrated"


def prompt_dialog(record: dict[str, Any]) -> list[Message]:
    """The dialog a pair's replies answer: `messages` (ending with a user turn) or `prompt` as one user turn."""
    if "messages" in record:
        if not isinstance(record["messages"], list):
            raise ValueError("'messages' must be a list of {role, content} objects ending with a user turn")
        return list(record["messages"])
    if isinstance(record.get("prompt"), str) and record["prompt"].strip():
        return [{"role": "user", "content": record["prompt"]}]
    raise ValueError("record needs a non-empty 'prompt' string or a 'messages' dialog")


def _reply(record: dict[str, Any], side: str) -> str:
    value = record.get(side)
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) \
            and value[0].get("role") == "assistant":
        value = value[0].get("content")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"'{side}' must be a non-empty string (or one assistant message)")
    return value


@dataclass
class Pair:
    chosen: tuple[list[int], list[bool]]  # ids and per-id "reply token" flags
    rejected: tuple[list[int], list[bool]]
    level: int


def encode_pair(record: Any, tokenizer: Tokenizer, seq_len: int, truncate: bool = True) -> tuple[Pair, str | None]:
    """A record's two sides in at most `seq_len` tokens each, and why they were cut (None if they fit); a
    ValueError names what is wrong with an unusable record."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    dialog = prompt_dialog(record)
    level = rating_level(record.get("rating"))
    sides, cut = [], None
    for side in SIDES:
        ids, learn = encode_turns(tokenizer, [*dialog, {"role": "assistant", "content": _reply(record, side)}],
                                  "assistant", last_turn_only=True)
        if len(ids) > seq_len:
            problem = f"{side}: {len(ids)} tokens, more than seq_len = {seq_len}"
            if not truncate:
                raise ValueError(problem)
            ids, learn = ids[:seq_len], learn[:seq_len]
            if not any(learn[1:]):
                raise ValueError(f"{problem}, and no reply token is left after truncating it")
            cut = problem
        sides.append((ids, learn))
    if record["chosen"] == record["rejected"]:
        raise ValueError("'chosen' and 'rejected' are the same reply")
    return Pair(sides[0], sides[1], level), cut


def read_pairs(spec: str, tokenizer: Tokenizer, seq_len: int, policy: str = "truncate",
               setting: str = "finetune.train") -> tuple[list[Pair], RecordIssues]:
    """Every usable pair of the JSONL files in `spec` (comma-separated, globs, gs://), bad records reported."""
    return read_records(spec, lambda record, truncate: encode_pair(record, tokenizer, seq_len, truncate), policy,
                        setting)


def on_both_sides(fn: Callable[..., jax.Array], batch: dict[str, jax.Array], *fields: str
                  ) -> tuple[jax.Array, jax.Array]:
    """`fn(*fields)` of the chosen and of the rejected sides of a batch, run as one batch of both (one forward pass)."""
    out = fn(*(jnp.concatenate([batch[f"{side}_{name}"] for side in SIDES]) for name in fields))
    return out[:len(out) // 2], out[len(out) // 2:]


def preference_metrics(chosen: jax.Array, rejected: jax.Array) -> dict[str, jax.Array]:
    """Per-pair metric sums of scores (rewards, implicit rewards): accuracy (chosen above rejected), the mean chosen
    and rejected scores and their margin once the train step divides them by the pair count."""
    return {"accuracy": jnp.sum(chosen > rejected).astype(jnp.float32), "chosen_reward": jnp.sum(chosen),
            "rejected_reward": jnp.sum(rejected), "margin": jnp.sum(chosen - rejected)}


def pair_rows(pairs: Sequence[Pair], seq_len: int) -> dict[str, np.ndarray]:
    """Arrays of every pair: `<side>_ids`/`<side>_learn` `[n, seq_len]`, `<side>_length` and `level` `[n]`."""
    n = len(pairs)
    rows = {"level": np.array([p.level for p in pairs], np.int32)}
    for side in SIDES:
        ids, learn = np.zeros((n, seq_len), np.int32), np.zeros((n, seq_len), np.int32)
        length = np.zeros(n, np.int32)
        for i, pair in enumerate(pairs):
            seq, flags = getattr(pair, side)
            ids[i, :len(seq)], learn[i, :len(seq)], length[i] = seq, flags, len(seq)
        rows |= {f"{side}_ids": ids, f"{side}_learn": learn, f"{side}_length": length}
    return rows


def sequence_rows(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                  seq_len: int | None = None) -> dict[str, np.ndarray]:
    """`ids`, `learn` (1 on the completion) and `length` of prompt + completion sequences, right-padded to the
    longest (or `seq_len`), for scoring and log-probabilities of sampled replies."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions; give one completion each")
    longest = max(len(p) + len(c) for p, c in zip(prompts, completions))
    width = longest if seq_len is None else seq_len
    if longest > width:
        raise ValueError(f"a prompt plus its completion has {longest} tokens, more than {width}")
    pairs = [Pair(([*p, *c], [False] * len(p) + [True] * len(c)), ([], []), UNRATED)
             for p, c in zip(prompts, completions)]
    rows = pair_rows(pairs, width)
    return {"ids": rows["chosen_ids"], "learn": rows["chosen_learn"], "length": rows["chosen_length"]}


@dataclass
class PreferenceData:
    train: DataIterator
    train_pairs: int
    steps_per_epoch: int
    issues: RecordIssues


def preference_fingerprint(cfg: Config, tokenizer: Tokenizer, *extra: Any) -> str:
    ft = cfg.finetune
    return fingerprint_of("preferences", ft.train, ft.bad_records, cfg.data.seq_len, cfg.data.shuffle_seed,
                        cfg.train.batch_size, tokenizer_hash(tokenizer), *extra)


def build_preference_data(cfg: Config, tokenizer: Tokenizer, mesh: Mesh | None, rows: dict[str, np.ndarray],
                          issues: RecordIssues, *fingerprint_extra: Any) -> PreferenceData:
    """Endless, checkpointable batches of pair rows (`rows` from `pair_rows`, plus any per-pair fields a stage
    adds, such as cached reference log-probabilities), shuffled afresh each epoch."""
    index, count = process_slot(None, None)
    n = len(rows["level"])
    train = row_iterator(rows, cfg, mesh, preference_fingerprint(cfg, tokenizer, *fingerprint_extra), "pairs",
                         index, count)
    return PreferenceData(train, n, math.ceil(n / cfg.train.batch_size), issues)
