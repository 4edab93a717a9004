"""An interactive multi-turn Llama-2-chat session over any line source (a terminal, or piped text in tests)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from llama_jax.chat import CHAT_TEMPERATURE, CHAT_TOP_P, SPECIAL_TAGS, Message, encode_dialog
from llama_jax.inference.prefix_cache import PrefixCache
from llama_jax.inference.text import complete
from llama_jax.model import Llama
from llama_jax.tokenizer import Tokenizer

PROMPT = "> "
HELP = "Type a message; /reset clears the history, /exit quits.\n"


def fit_dialog(tokenizer: Tokenizer, system: list[Message], turns: list[Message], max_prompt: int
               ) -> list[int] | None:
    """Prompt ids for the dialog, dropping the oldest (user, assistant) pairs until it fits `max_prompt` tokens.

    Returns None when even the last user message alone is too long. `turns` is trimmed in place.
    """
    while True:
        ids = encode_dialog(tokenizer, system + turns)
        if len(ids) <= max_prompt:
            return ids
        if len(turns) == 1:
            return None
        del turns[:2]


def _without_tags(reply: str) -> str:
    """A reply as kept in the history: chat tags a model might emit are removed so the dialog stays encodable."""
    for tag in SPECIAL_TAGS:
        reply = reply.replace(tag, "")
    return reply


def chat(model: Llama, tokenizer: Tokenizer, lines: Iterable[str], write: Callable[[str], None],
         system: str | None = None, max_new_tokens: int = 512, temperature: float = CHAT_TEMPERATURE,
         top_p: float = CHAT_TOP_P, top_k: int = 0, seed: int = 0) -> list[Message]:
    """Read user messages from `lines`, stream each reply to `write`, keep the history; return the final dialog.

    `/reset` forgets the history (the system message stays), `/exit` or the end of `lines` ends the session. When
    the history outgrows the model's context, the oldest exchanges are dropped. Turn i samples with `seed + i`.
    The KV cache stays from turn to turn, so a turn runs its new message rather than the whole dialog again.
    """
    system_msgs: list[Message] = [{"role": "system", "content": system}] if system else []
    turns: list[Message] = []
    max_prompt = model.cfg.max_seq_len - 1
    prefix_cache = PrefixCache()
    write(HELP)
    write(PROMPT)
    for turn, line in enumerate(lines):
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            turns.clear()
            write("(history cleared)\n")
        elif text:
            turns.append({"role": "user", "content": text})
            try:
                ids = fit_dialog(tokenizer, system_msgs, turns, max_prompt)
            except ValueError as err:
                ids, problem = None, str(err)
            else:
                problem = (f"that message does not fit the model's context of {model.cfg.max_seq_len} tokens; "
                           "send a shorter one")
            if ids is None:
                turns.pop()
                write(f"error: {problem}\n")
            else:
                (reply,) = complete(model, tokenizer, [ids], lambda _, piece: write(piece), context_tokens=0,
                                    max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                    top_k=top_k, seed=seed + turn, prefix_cache=prefix_cache)
                turns.append({"role": "assistant", "content": _without_tags(reply)})
                write("\n")
        write(PROMPT)
    write("\n")
    return system_msgs + turns
