"""Ghost Attention (GAtt) data (Llama 2 paper section 3.3): dialogs that keep obeying a first-turn instruction.

For every dialog an instruction is drawn: one to `max_combined` entries from different categories (hobbies,
languages, personas, ...), each in its short form with probability `shorten` (the paper shortened half of them).
While the current model samples the replies, the instruction is attached to *every* user turn, so each reply obeys
it; the training record keeps it only in the first user turn and learns only the last reply (earlier replies carry
`"train": false`, so `llama_jax.data.sft` zeroes their loss as it does for user turns).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import yaml

from llama_jax.chat import Message, encode_dialog
from llama_jax.checkpoints import load_pretrained
from llama_jax.config import Config, ConfigError, GattConfig
from llama_jax.data.records import read_records
from llama_jax.distributed import initialize
from llama_jax.inference.text import complete
from llama_jax.model import Llama
from llama_jax.paths import as_path
from llama_jax.sharding import make_mesh
from llama_jax.tokenizer import Tokenizer
from llama_jax.training.finetune import _tokenizer

Instructions = dict[str, list[tuple[str, str]]]
"""category -> [(full text, short text)]"""
ReplyFn = Callable[[list[list[Message]]], list[str | None]]
"""Replies to a batch of dialogs that each end with a user turn (None for one that no longer fits the context)."""


def read_instructions(path: str) -> Instructions:
    """A YAML/JSON mapping category -> list of instructions, each a string or `{full, short}`."""
    raw = yaml.safe_load(as_path(path).read_text())
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: instructions must map categories (hobbies, languages, ...) to lists")
    out: Instructions = {}
    for category, entries in raw.items():
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{path}: category '{category}' must be a non-empty list of instructions")
        out[str(category)] = []
        for entry in entries:
            full = entry if isinstance(entry, str) else entry.get("full") if isinstance(entry, dict) else None
            if not isinstance(full, str) or not full.strip():
                raise ValueError(f"{path}: category '{category}' has an entry without text: {entry!r}")
            short = entry.get("short", full) if isinstance(entry, dict) else full
            out[str(category)].append((full.strip(), str(short).strip()))
    return out


def draw_instruction(instructions: Instructions, rng: np.random.Generator, max_combined: int, shorten: float) -> str:
    """1..`max_combined` instructions from distinct categories, each shortened with probability `shorten`."""
    categories = sorted(instructions)
    n = int(rng.integers(1, min(max_combined, len(categories)) + 1))
    parts = []
    for category in rng.choice(categories, n, replace=False):
        full, short = instructions[str(category)][int(rng.integers(len(instructions[str(category)])))]
        parts.append(short if rng.random() < shorten else full)
    return " ".join(parts)


def with_instruction(messages: list[Message], instruction: str, every_turn: bool) -> list[Message]:
    """The dialog with `instruction` put before the first user turn's text (and every later one's if asked)."""
    out, first = [], True
    for m in messages:
        if m["role"] == "user" and (first or every_turn):
            m = {**m, "content": f"{instruction} {m['content']}"}
            first = False
        out.append(dict(m))
    return out


def training_records(messages: list[Message], instruction: str, all_turns: bool) -> list[dict[str, Any]]:
    """SFT records of a sampled dialog: the instruction in the first user turn only, the loss on the last reply
    only (one record per reply with `all_turns`, else one for the whole dialog)."""
    dialog = with_instruction(messages, instruction, every_turn=False)
    replies = [i for i, m in enumerate(dialog) if m["role"] == "assistant"]
    records = []
    for end in replies if all_turns else replies[-1:]:
        turns = [{**m, "train": False} if m["role"] == "assistant" and i < end else m
                 for i, m in enumerate(dialog[:end + 1])]
        records.append({"messages": turns, "instruction": instruction})
    return records


def build_gatt(dialogs: list[list[Message]], instructions: Instructions, reply: ReplyFn, cfg: GattConfig,
               seed: int = 0) -> list[dict[str, Any]]:
    """Sample every dialog's replies turn by turn (all dialogs' turn t in one batch) with the instruction on every
    user turn, then turn each into training records. A dialog keeps its user turns; its replies are replaced. One
    that outgrows the context ends at its last reply that fitted."""
    rng = np.random.default_rng(seed)
    drawn = [draw_instruction(instructions, rng, cfg.max_combined, cfg.shorten) for _ in dialogs]
    users = [[m for m in d if m["role"] == "user"] for d in dialogs]
    sampled: list[list[Message]] = [[] for _ in dialogs]
    for turn in range(max(len(u) for u in users)):
        active = [i for i, u in enumerate(users) if turn < len(u) and len(sampled[i]) == 2 * turn]
        for first in range(0, len(active), cfg.batch_size):
            chunk = active[first:first + cfg.batch_size]
            prompts = [with_instruction([*sampled[i], users[i][turn]], drawn[i], every_turn=True) for i in chunk]
            for i, text in zip(chunk, reply(prompts), strict=True):
                if text is not None:
                    sampled[i] += [users[i][turn], {"role": "assistant", "content": text}]
    return [record for i, dialog in enumerate(sampled) if dialog and all(m["content"].strip() for m in dialog)
            for record in training_records(dialog, drawn[i], cfg.all_turns)]


def model_replies(model: Llama, tokenizer: Tokenizer, cfg: GattConfig, seed: int = 0) -> ReplyFn:
    """A `ReplyFn` sampling from `model` with the config's temperature and top-p."""
    calls = iter(range(1 << 30))

    def reply(prompts: list[list[Message]]) -> list[str | None]:
        ids = [encode_dialog(tokenizer, p) for p in prompts]
        fits = [i for i, p in enumerate(ids) if len(p) < model.cfg.max_seq_len - 1]
        texts: list[str | None] = [None] * len(prompts)
        if fits:
            replies = complete(model, tokenizer, [ids[i] for i in fits], context_tokens=0,
                               max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                               seed=seed + next(calls))
            for i, text in zip(fits, replies, strict=True):
                texts[i] = text.strip()
        return texts
    return reply


def read_dialogs(spec: str) -> list[list[Message]]:
    """Dialogs (JSONL `messages`) with at least one user turn; the system message, if any, is dropped (GAtt's
    instruction takes its place)."""
    def encode(record: Any, _: bool) -> tuple[list[Message], None]:
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not any(isinstance(m, dict) and m.get("role") == "user"
                                                     for m in messages):
            raise ValueError("a dialog record needs 'messages' with at least one user turn")
        return [m for m in messages if m.get("role") != "system"], None
    return read_records(spec, encode, "fail", "gatt.dialogs")[0]


@dataclass
class GattResult:
    """Where `gatt` wrote its records, and how many it made of how many dialogs."""

    output: str
    dialogs: int
    records: int

    def report(self) -> str:
        return f"ghost attention: {self.records} records from {self.dialogs} dialogs written to {self.output}"


def gatt(cfg: Config) -> GattResult:
    """Build GAtt training data with `gatt.init_from` sampling the replies; write `gatt.output` (SFT JSONL)."""
    g = cfg.gatt
    if not g.init_from or not g.dialogs or not g.instructions or not g.output:
        raise ConfigError("gatt.init_from, gatt.dialogs, gatt.instructions and gatt.output must all be set")
    initialize(cfg.train)
    tokenizer = _tokenizer(dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, init_from=g.init_from)))
    model = load_pretrained(g.init_from, make_mesh(cfg.mesh), cfg.execution)
    dialogs = read_dialogs(g.dialogs)
    records = build_gatt(dialogs, read_instructions(g.instructions), model_replies(model, tokenizer, g,
                                                                                    cfg.train.seed), g, cfg.train.seed)
    output = as_path(g.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("".join(json.dumps(r) + "\n" for r in records))
    return GattResult(str(output), len(dialogs), len(records))
