"""Supervised fine-tuning data: records (JSONL, TFDS, HF datasets; `records.py`) -> token examples with answer-only
loss -> packed rows -> batches.

A record is one of three shapes: `{"messages": [...]}` (a Llama-2-chat dialog ending with an assistant turn,
encoded by `llama_jax.chat.encode_turns`; loss on every reply not marked `"train": false`, or only the last with
`last_turn_only`),
`{"prompt": ..., "completion": ...}` (`<s> prompt completion </s>`, loss on the completion and EOS) or `{"text": ...}`
(`<s> text </s>`, loss on everything). Unusable records are never dropped silently: each is reported with its file
and line (or dataset and record index), and the `bad_records` policy decides whether it is skipped, truncated (over-long ones) or fatal.

Rows hold `seq_len` positions: `tokens` (inputs), `targets` (the next tokens), `loss_mask` (1 where the target is
learned), `segment_ids` (1, 2, ... per packed example, 0 = padding) and `positions` (restarting at 0 in each
example), so attention and RoPE treat every packed example as if it ran alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grain
import numpy as np
from jax.sharding import Mesh

from llama_jax.chat import encode_turns
from llama_jax.config import Config, ConfigError, DataConfig
from llama_jax.data.pipeline import (
    READ_OPTIONS,
    DataIterator,
    ValidationData,
    fingerprint_of,
    _local_batch,
    process_slot,
    _seed,
)
from llama_jax.data.records import RecordIssues, read_records
from llama_jax.data.tokenized import tokenizer_hash
from llama_jax.tokenizer import Tokenizer

ROW_FIELDS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


@dataclass
class Examples(RecordIssues):
    """Encoded examples (token ids and per-token "learn this token" flags) and the records that were not usable."""

    ids: list[np.ndarray] = field(default_factory=list)
    learn: list[np.ndarray] = field(default_factory=list)


def encode_record(record: Any, tokenizer: Tokenizer, last_turn_only: bool = False) -> tuple[list[int], list[bool]]:
    """Ids and learn-flags of one record, or a ValueError saying what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        if not isinstance(record["messages"], list):
            raise ValueError("'messages' must be a list of {role, content} objects")
        ids, learn = encode_turns(tokenizer, record["messages"], "assistant", last_turn_only)
    elif "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError("'prompt' and 'completion' must both be strings")
        if not completion.strip():
            raise ValueError("'completion' is empty")
        head = tokenizer.encode(prompt, bos=True)
        tail = tokenizer.encode(completion, eos=True)
        ids, learn = head + tail, [False] * len(head) + [True] * len(tail)
    elif "text" in record:
        if not isinstance(record["text"], str) or not record["text"].strip():
            raise ValueError("'text' must be a non-empty string")
        ids = tokenizer.encode(record["text"], bos=True, eos=True)
        learn = [False] + [True] * (len(ids) - 1)
    else:
        raise ValueError(f"record has none of 'messages', 'prompt'/'completion', 'text' (keys: {sorted(record)})")
    return ids, learn


def read_examples(spec: str, tokenizer: Tokenizer, seq_len: int, policy: str = "truncate",
                  last_turn_only: bool = False, split: str = "train", data: DataConfig | None = None,
                  fields: Mapping[str, str] | None = None) -> Examples:
    """Encode every record of `spec` (JSONL files or a dataset's `split`, see `records.py`); examples longer than
    `seq_len + 1` tokens follow `policy`."""
    def encode(record: Any, truncate: bool) -> tuple[tuple[list[int], list[bool]], str | None]:
        ids, learn = encode_record(record, tokenizer, last_turn_only)
        problem = None
        if len(ids) > seq_len + 1:
            problem = f"{len(ids)} tokens, more than seq_len + 1 = {seq_len + 1}"
            if not truncate:
                raise ValueError(problem)
            ids, learn = ids[:seq_len + 1], learn[:seq_len + 1]
            if not any(learn[1:]):
                raise ValueError(f"{problem}, and no answer token is left after truncating it")
        if not any(learn[1:]):
            raise ValueError("no answer tokens to learn")
        return (ids, learn), problem

    items, issues = read_records(spec, encode, policy, "finetune.train", split, data, fields)
    return Examples(issues.bad, issues.truncated, [np.asarray(i, np.int32) for i, _ in items],
                    [np.asarray(f, bool) for _, f in items])


def pack(examples: Examples, seq_len: int, packing: bool = True, order: np.ndarray | None = None
         ) -> dict[str, np.ndarray]:
    """Rows `[n_rows, seq_len]` of ROW_FIELDS: examples (in `order`) placed one after another while they fit
    (`packing`), else one per row; the rest of a row is padding (segment 0, loss_mask 0)."""
    order = np.arange(len(examples.ids)) if order is None else order
    rows: list[list[int]] = []
    used = seq_len
    for i in order:
        length = len(examples.ids[i]) - 1
        if not packing or used + length > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(int(i))
        used += length
    out = {k: np.zeros((len(rows), seq_len), np.int32) for k in ROW_FIELDS}
    for r, members in enumerate(rows):
        start = 0
        for segment, i in enumerate(members, 1):
            ids, learn = examples.ids[i], examples.learn[i]
            span = slice(start, start + len(ids) - 1)
            out["tokens"][r, span] = ids[:-1]
            out["targets"][r, span] = ids[1:]
            out["loss_mask"][r, span] = learn[1:]
            out["segment_ids"][r, span] = segment
            out["positions"][r, span] = np.arange(len(ids) - 1)
            start += len(ids) - 1
    return out


def _row_dataset(rows: dict[str, np.ndarray]) -> grain.MapDataset:
    """Row i as a dict, with the (single) source index the shared `DataIterator` counts tokens by."""
    return grain.MapDataset.source(list(range(len(next(iter(rows.values())))))).map(
        lambda i: {**{k: v[i] for k, v in rows.items()}, "source": np.int32(0)})


def row_iterator(rows: dict[str, np.ndarray], cfg: Config, mesh: Mesh | None, fingerprint: str, label: str,
                 index: int, count: int) -> DataIterator:
    """Endless batches of `train.batch_size` rows (this process's share), shuffled afresh each epoch by
    `data.shuffle_seed`, checkpointable; tokens are counted under `label`."""
    shuffled = _row_dataset(rows).shuffle(seed=_seed(cfg.data.shuffle_seed, 1)).repeat()
    local = _local_batch(cfg.train.batch_size, count)
    return DataIterator(shuffled[index::count].batch(local).to_iter_dataset(READ_OPTIONS), mesh, fingerprint,
                        [label], cfg.data.seq_len)


@dataclass
class SFTData:
    train: DataIterator
    validation: ValidationData | None
    train_rows: int
    train_examples: int
    steps_per_epoch: int


def build_sft_data(cfg: Config, tokenizer: Tokenizer, mesh: Mesh | None = None, *, process_index: int | None = None,
                   process_count: int | None = None) -> SFTData:
    """Packed training rows (shuffled afresh each epoch, endless, checkpointable) and the validation rows in order
    (the last batch filled with empty rows so no example is dropped)."""
    ft, seq_len, batch_size = cfg.finetune, cfg.data.seq_len, cfg.train.batch_size
    if not 0 < seq_len <= cfg.model.max_seq_len:
        raise ConfigError(f"data.seq_len {seq_len} must be in 1..model.max_seq_len ({cfg.model.max_seq_len})")
    index, count = process_slot(process_index, process_count)
    local = _local_batch(batch_size, count)
    examples = read_examples(ft.train, tokenizer, seq_len, ft.bad_records, ft.last_turn_only, ft.train_split,
                             cfg.data, ft.fields)
    order = np.random.default_rng(_seed(cfg.data.shuffle_seed, 0)).permutation(len(examples.ids))
    rows = pack(examples, seq_len, ft.packing, order)
    n_rows = len(rows["tokens"])
    fingerprint = fingerprint_of("sft", ft.train, ft.train_split, ft.fields, ft.packing, ft.last_turn_only,
                                 ft.bad_records, seq_len, cfg.data.shuffle_seed, batch_size, tokenizer_hash(tokenizer))
    train = row_iterator(rows, cfg, mesh, fingerprint, "finetune", index, count)
    validation = None
    if ft.validation:
        held = read_examples(ft.validation, tokenizer, seq_len, ft.bad_records, ft.last_turn_only,
                             ft.validation_split, cfg.data, ft.fields)
        val_rows = pack(held, seq_len, ft.packing)
        pad = -len(val_rows["tokens"]) % batch_size
        val_rows = {k: np.concatenate([v, np.zeros((pad, seq_len), v.dtype)]) for k, v in val_rows.items()}
        validation = ValidationData(_row_dataset(val_rows)[index::count].batch(local), mesh,
                                    fingerprint_of(fingerprint, ft.validation, ft.validation_split))
    return SFTData(train, validation, n_rows, len(examples.ids), math.ceil(n_rows / batch_size))
