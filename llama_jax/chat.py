"""Llama-2-chat prompt encoding, token for token as Meta's `Llama.chat_completion` builds it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

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
    dialog = _validate(messages)
    if dialog[0]["role"] == "system":
        dialog = [
            {"role": "user", "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]},
            *dialog[2:],
        ]
    ids: list[int] = []
    for user, answer in zip(dialog[::2], dialog[1::2]):
        text = f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} "
        ids += tokenizer.encode(text, bos=True, eos=True)
    ids += tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True)
    return ids


def _validate(messages: Sequence[Message]) -> list[Message]:
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
    if dialog[-1]["role"] != "user":
        raise ValueError(f"dialog must end with a user message, got {dialog[-1]['role']!r}")
    return dialog
