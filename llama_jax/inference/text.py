"""Text in, text out: tokenize prompts, generate, and turn new ids back into text (optionally as a live stream)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from llama_jax.inference.generate import PAD, generate
from llama_jax.model import Llama
from llama_jax.tokenizer import Tokenizer


def continuation(tokenizer: Tokenizer, context: Sequence[int], ids: Sequence[int]) -> str:
    """Text of `ids` as it reads after `context` (ids already shown), EOS dropped.

    sentencepiece drops a leading space at the start of a string, so `ids` are decoded behind `context` and only
    the suffix is kept; that way `prompt + continuation` reads right.
    """
    ids = [t for t in ids if t not in (PAD, tokenizer.eos_id)]
    shown, full = tokenizer.decode(list(context)), tokenizer.decode(list(context) + ids)
    return full[len(shown):] if full.startswith(shown) else tokenizer.decode(ids)


class TextStream:
    """Turns ids arriving one at a time into text pieces for `write`, holding back incomplete UTF-8 characters."""

    def __init__(self, tokenizer: Tokenizer, write: Callable[[str], None], context: Sequence[int] = ()):
        self.tokenizer, self.write, self.context = tokenizer, write, list(context)
        self.ids: list[int] = []
        self.shown = ""

    def push(self, token: int) -> None:
        if token == PAD:
            return
        self.ids.append(token)
        text = continuation(self.tokenizer, self.context, self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.shown) or text == self.shown:
            return
        self.write(text[len(self.shown):])
        self.shown = text

    def finish(self) -> None:
        """Write what is still held back once no more ids come (an unfinished character decodes as U+FFFD)."""
        text = continuation(self.tokenizer, self.context, self.ids)
        if text.startswith(self.shown) and text != self.shown:
            self.write(text[len(self.shown):])
            self.shown = text


def complete(model: Llama, tokenizer: Tokenizer, prompt_ids: Sequence[Sequence[int]],
             on_text: Callable[[int, str], None] | None = None, context_tokens: int = 1, **kwargs) -> list[str]:
    """Generate from token prompts until EOS; return each continuation as text, streaming `on_text(row, piece)`.

    The last `context_tokens` prompt ids decode in front of the reply, so a continuation keeps its leading space;
    0 gives the reply on its own, as a chat turn wants it.
    """
    contexts = [list(p[len(p) - context_tokens:]) if context_tokens else [] for p in prompt_ids]
    stream = None
    if on_text is not None:
        streams = [TextStream(tokenizer, lambda piece, row=row: on_text(row, piece), ctx)
                   for row, ctx in enumerate(contexts)]

        def stream(tokens: np.ndarray) -> None:
            for row, token in enumerate(tokens.tolist()):
                streams[row].push(token)

    new_ids = generate(model, prompt_ids, eos_id=tokenizer.eos_id, stream=stream, **kwargs)
    return [continuation(tokenizer, ctx, ids) for ctx, ids in zip(contexts, new_ids)]


def generate_text(model: Llama, tokenizer: Tokenizer, prompts: Sequence[str], max_new_tokens: int = 256,
                  temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                  on_text: Callable[[int, str], None] | None = None) -> list[str]:
    """Continue each text prompt (BOS prepended, stop at the tokenizer's EOS); return the continuations."""
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings; wrap a single prompt as [prompt]")
    ids = [tokenizer.encode(p, bos=True) for p in prompts]
    return complete(model, tokenizer, ids, on_text, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_p=top_p, top_k=top_k, seed=seed)
