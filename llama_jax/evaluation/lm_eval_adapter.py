"""lm-evaluation-harness backed by llama_jax: `lm_eval --model llama_jax --model_args checkpoint=DIR,tokenizer=FILE`.

Importing this module registers the model name `llama_jax` in lm_eval's registry (lm_eval has no plugin discovery,
so `python -m llama_jax lm-eval ...` imports it and then runs lm_eval's own CLI: `llama_jax.evaluation.run_lm_eval`). Log-likelihoods come from
`score_continuations` (batched, sharded forward passes), generation from `llama_jax.generate` with stop sequences.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from llama_jax.evaluation.loglikelihood import score_continuations
from llama_jax.inference.load import load_sharded
from llama_jax.inference.stops import cut_at_stop
from llama_jax.inference.text import complete
from llama_jax.model import Llama
from llama_jax.tokenizer import Tokenizer

MODEL_NAME = "llama_jax"


@register_model(MODEL_NAME)
class LlamaJaxLM(LM):
    """A llama_jax checkpoint (any format) and its sentencepiece tokenizer as an lm_eval model.

    `model_args`: checkpoint, tokenizer, dtype, batch_size, max_gen_toks and the mesh sizes data / fsdp / tensor.
    Pass `model=` (a `Llama`) and `tokenizer=` (a `Tokenizer`) from Python instead of paths.
    """

    def __init__(self, checkpoint: str | None = None, tokenizer: str | Tokenizer | None = None,
                 dtype: str | None = None, batch_size: int | str = 8, max_gen_toks: int = 256, data: int = 1,
                 fsdp: int = -1, tensor: int = 1, model: Llama | None = None, **ignored: Any):
        super().__init__()
        if tokenizer is None or (model is None) == (checkpoint is None):
            raise ValueError("give tokenizer= and exactly one of checkpoint= (a path) or model= (a Llama)")
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size=auto is not supported; pass a number, e.g. --batch_size 8")
        self.model = model if model is not None else load_sharded(checkpoint, dtype, int(data), int(fsdp),
                                                                  int(tensor))
        self.tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
        self.batch_size, self.max_gen_toks = int(batch_size), int(max_gen_toks)

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Ids of BOS + context and of the continuation, split from the encoding of the joined text.

        sentencepiece merges across the boundary (" world" alone encodes differently than after "hello"), so the
        continuation is what the whole text adds beyond the context's own encoding, as lm_eval's HF model does.
        """
        context_ids = self.tok.encode(context, bos=True)
        whole = self.tok.encode(context + continuation, bos=True)
        if whole[:len(context_ids)] != context_ids:
            return context_ids, self.tok.encode(continuation)
        return context_ids, whole[len(context_ids):]

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        pairs = [self._pair(*request.args) for request in requests]
        return score_continuations(self.model, pairs, self.batch_size)

    def loglikelihood_rolling(self, requests: Sequence[Any]) -> list[float]:
        """Whole-document log-likelihood over disjoint windows of the context length, each predicted token once."""
        windows, owner = [], []
        for i, request in enumerate(requests):
            ids = self.tok.encode(request.args[0])
            for window in get_rolling_token_windows(ids, self.tok.bos_id, self.model.cfg.max_seq_len, 1):
                windows.append(make_disjoint_window(window))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, score_continuations(self.model, windows, self.batch_size)):
            totals[i] += logprob
        return totals

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Greedy (or sampled, per `gen_kwargs`) continuations, cut at the first of the `until` sequences."""
        groups: dict[tuple, list[int]] = {}
        settings = [self._generation_settings(request.args[1]) for request in requests]
        for i, setting in enumerate(settings):
            groups.setdefault(setting, []).append(i)
        outputs = [""] * len(requests)
        for (stops, max_new, temperature, top_p), members in groups.items():
            room = self.model.cfg.max_seq_len - max_new
            for start in range(0, len(members), self.batch_size):
                rows = members[start:start + self.batch_size]
                prompts = [self.tok.encode(requests[i].args[0], bos=True)[-room:] for i in rows]
                texts = complete(self.model, self.tok, prompts, max_new_tokens=max_new, temperature=temperature,
                                 top_p=top_p)
                for i, text in zip(rows, texts):
                    outputs[i] = cut_at_stop(text, stops)[0]
        return outputs

    def _generation_settings(self, gen_kwargs: dict[str, Any]) -> tuple[tuple[str, ...], int, float, float]:
        until = gen_kwargs.get("until") or []
        stops = (until,) if isinstance(until, str) else tuple(until)
        max_new = min(int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)), self.model.cfg.max_seq_len - 1)
        temperature = float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample", False) else 0.0
        return stops, max_new, temperature, float(gen_kwargs.get("top_p", 1.0))

