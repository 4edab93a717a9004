"""Llama-2-chat prompt encoding, token for token as Meta's `Llama.chat_completion` builds it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import numpy as np

from llama_jax.tokenizer import Tokenizer

# Plain text, not special tokens: the tokenizer splits them into ordinary pieces.
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")

# Meta's sampling defaults for chat_completion.
CHAT_TEMPERATURE = 0.6
CHAT_TOP_P = 0.9


class Message(TypedDict):
    role: str  # "system" | "user" | "assistant"
    content: str


def encode_dialog(tokenizer: Tokenizer, messages: Sequence[Message]) -> list[int]:
    """Prompt ids for a dialog that ends with a user turn; the model's reply continues from here.

    A leading system message is folded into the first user turn; each (user, assistant) pair becomes
    `<s>[INST] u [/INST] a </s>` and the last user turn `<s>[INST] u [/INST]`.
    """
    return encode_turns(tokenizer, messages, final="user")[0]


def encode_turns(tokenizer: Tokenizer, messages: Sequence[Message], final: str = "assistant",
                 last_turn_only: bool = False) -> tuple[list[int], list[bool]]:
    """Ids of a dialog exactly as `encode_dialog` builds it, and per id whether it is an assistant reply token (the
    reply's pieces and its EOS: the tokens supervised fine-tuning learns), only in the last reply if
    `last_turn_only`, never in a reply marked `"train": false` (Ghost Attention's earlier turns). `final` is the role
    the dialog must end with ("assistant" for training examples).

    Each pair is encoded whole, as Meta does; the reply starts after the longest prefix it shares with the encoding
    of `[INST] u [/INST]` alone (sentencepiece pieces do not cross the space before the reply).
    """
    dialog = _validate(messages, final)
    if final == "assistant":  # a training example: an empty turn teaches nothing and usually means broken data
        empty = next((i for i, m in enumerate(dialog) if not m["content"].strip()), None)
        if empty is not None:
            raise ValueError(f"message {empty} ({dialog[empty]['role']}) has empty content")
    if dialog[0]["role"] == "system":
        dialog = [
            {"role": "user", "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]},
            *dialog[2:],
        ]
    ids: list[int] = []
    flags: list[bool] = []
    pairs = list(zip(dialog[::2], dialog[1::2]))
    for i, (user, answer) in enumerate(pairs):
        prompt = f"{B_INST} {user['content'].strip()} {E_INST}"
        pair = tokenizer.encode(f"{prompt} {answer['content'].strip()} ", bos=True, eos=True)
        shared = common_prefix(pair, tokenizer.encode(prompt, bos=True))
        learn = (not last_turn_only or i == len(pairs) - 1) and answer.get("train", True) is not False
        ids += pair
        flags += [False] * shared + [learn] * (len(pair) - shared)
    if len(dialog) % 2:
        last = tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True)
        ids += last
        flags += [False] * len(last)
    return ids, flags


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix of two id lists (compared in NumPy: the server compares each
    waiting prompt with every free slot's held dialog, thousands of ids each, between two decode steps)."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


def _validate(messages: Sequence[Message], final: str = "user") -> list[Message]:
    """The dialog as a list, or a one-line ValueError naming the first problem (Meta refuses the same inputs)."""
    dialog = list(messages)
    if not dialog:
        raise ValueError("empty dialog: give at least one user message")
    for i, m in enumerate(dialog):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be a dict with string 'role' and 'content', got {m!r}")
        tag = next((t for t in SPECIAL_TAGS if t in m["content"]), None)
        if tag is not None:
            raise ValueError(f"message {i} contains the chat tag {tag!r}; special tags are not allowed in content")
    start = 1 if dialog[0]["role"] == "system" else 0
    for i, m in enumerate(dialog[start:], start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if m["role"] != expected:
            where = "only the first message may be 'system'; " if m["role"] == "system" else ""
            raise ValueError(
                f"message {i} has role {m['role']!r}, expected {expected!r}: {where}"
                "roles must alternate user/assistant after an optional leading system message"
            )
    if dialog[-1]["role"] != final:
        raise ValueError(f"dialog must end with {'an' if final == 'assistant' else 'a'} {final} message, "
                         f"got {dialog[-1]['role']!r}")
    return dialog
