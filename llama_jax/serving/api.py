"""OpenAI-compatible routes over an `Engine`: /v1/completions, /v1/chat/completions, /v1/models, /health.

Errors follow OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: malformed JSON and invalid fields are
400, an unknown model 404, a prompt longer than the context 400, a full waiting queue 503. Streaming responses are
server-sent events (`data: {chunk}` ... `data: [DONE]`), as the `openai` client reads them.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import BaseModel, ConfigDict, Field

from llama_jax.chat import CHAT_TEMPERATURE, CHAT_TOP_P, encode_dialog
from llama_jax.inference.generate import check_prompts
from llama_jax.serving.engine import Engine, Event, Job, QueueFull

DISCONNECT_POLL_S = 0.5  # how often a request waiting for tokens checks whether its client is still there


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int = 0
    n: int = Field(default=1, ge=1, le=128)  # choices per prompt; choice k samples with seed + k


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(min_length=1)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


def _error(status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def _validation_message(err: RequestValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "invalid request: " + "; ".join(parts)


def create_app(engine: Engine, model_name: str) -> FastAPI:
    """The FastAPI app serving `engine`'s model under the id `model_name`."""
    app = FastAPI(title="llama_jax", summary="OpenAI-compatible LLaMA 2 server")
    tok, max_seq_len, created = engine.tokenizer, engine.model.cfg.max_seq_len, int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        return _error(400, _validation_message(err))

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> JSONResponse:
        return _error(err.status, err.message, err.code, err.param)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "waiting": engine.waiting, "running": engine.running, "batches": engine.batches,
                "batched_requests": engine.batched_requests}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "llama_jax"}]}

    def jobs_for(req: _Sampling, prompts: list[list[int]], contexts: list[list[int]], max_tokens: int | None,
                 temperature: float, top_p: float, emit: Callable[[int, Event], None]) -> list[Job]:
        if req.model != model_name:
            raise ApiError(404, f"model '{req.model}' not found; this server serves '{model_name}' (GET /v1/models)",
                           "model_not_found", "model")
        try:
            check_prompts(prompts, max_seq_len)
        except ValueError as err:
            raise ApiError(400, str(err), "context_length_exceeded", "prompt") from None
        if len(prompts) * req.n > engine.config.max_queue:
            raise ApiError(400, f"{len(prompts)} prompt(s) x n={req.n} is {len(prompts) * req.n} sequences, more than "
                                f"this server queues ({engine.config.max_queue}); lower n or send fewer prompts",
                           "too_many_choices", "n")
        stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        # Choice i * n + k of prompt i: the engine prefills the prompt once and copies it to the other k.
        return [Job(prompt, min(max_tokens or max_seq_len, max_seq_len - len(prompt)),
                    lambda event, i=i * req.n + k: emit(i, event), temperature, top_p, stops, tuple(ctx), req.seed + k)
                for i, (prompt, ctx) in enumerate(zip(prompts, contexts)) for k in range(req.n)]

    async def run(request: Request, jobs: list[Job], events: asyncio.Queue) -> AsyncIterator[tuple[int, Event]]:
        """Submit `jobs` and yield their (index, event)s until each has finished; cancel them if the client leaves."""
        try:
            for job in jobs:
                engine.submit(job)
        except QueueFull as err:
            for job in jobs:
                engine.cancel(job)
            raise ApiError(503, str(err), "server_busy") from None
        open_jobs = len(jobs)
        try:
            while open_jobs:
                try:
                    index, event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if event.error is not None:
                    raise ApiError(500, event.error, "generation_failed")
                open_jobs -= event.finish_reason is not None
                yield index, event
        finally:
            for job in jobs:
                engine.cancel(job)

    def emitter(events: asyncio.Queue) -> Callable[[int, Event], None]:
        """Hand events from the engine thread to this request's queue on the server's event loop."""
        loop = asyncio.get_running_loop()

        def emit(i: int, event: Event) -> None:
            if not loop.is_closed():  # after shutdown nobody is listening
                loop.call_soon_threadsafe(events.put_nowait, (i, event))
        return emit

    def usage(jobs: list[Job], completion_tokens: int, n: int) -> dict[str, int]:
        prompt_tokens = sum(len(j.prompt) for j in jobs[::n])  # each prompt once, as OpenAI counts `n` choices
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def respond(request: Request, jobs: list[Job], events: asyncio.Queue, stream: bool, n: int,
                      head: dict[str, Any], choice: Callable[[int, str, str | None], dict[str, Any]],
                      first: list[dict[str, Any]] = ()) -> Any:
        """A JSON body with every choice's full text, or an SSE stream of chunks built by `choice`."""
        if not stream:
            texts, reasons, tokens = [""] * len(jobs), [None] * len(jobs), 0
            async for i, event in run(request, jobs, events):
                texts[i] += event.text
                if event.finish_reason is not None:
                    reasons[i], tokens = event.finish_reason, tokens + event.completion_tokens
            return {**head, "choices": [choice(i, t, r) for i, (t, r) in enumerate(zip(texts, reasons))],
                    "usage": usage(jobs, tokens, n)}
        chunks = run(request, jobs, events)
        first_event = await anext(chunks, None)  # errors (busy, bad model) surface before the stream starts

        def encode(choices: list[dict[str, Any]]) -> bytes:
            return format_sse_event(data_str=json.dumps({**head, "choices": choices}))

        async def sse() -> AsyncIterator[bytes]:
            try:
                for c in first:
                    yield encode([c])
                if first_event is not None:
                    yield encode([choice(first_event[0], first_event[1].text, first_event[1].finish_reason)])
                async for i, event in chunks:
                    yield encode([choice(i, event.text, event.finish_reason)])
                yield format_sse_event(data_str="[DONE]")
            finally:  # the client left mid-stream: free its rows now
                await chunks.aclose()

        return EventSourceResponse(sse())

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        prompts = [tok.encode(t, bos=True) for t in texts]
        events: asyncio.Queue = asyncio.Queue()
        jobs = jobs_for(req, prompts, [p[-1:] for p in prompts], req.max_tokens or 16,
                        1.0 if req.temperature is None else req.temperature,
                        1.0 if req.top_p is None else req.top_p, emitter(events))
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}
        return await respond(request, jobs, events, req.stream, req.n, head,
                             lambda i, text, reason: {"index": i, "text": text, "finish_reason": reason,
                                                      "logprobs": None})

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request) -> Any:
        try:
            prompt = encode_dialog(tok, [m.model_dump() for m in req.messages])
        except ValueError as err:
            raise ApiError(400, str(err), "invalid_dialog", "messages") from None
        events: asyncio.Queue = asyncio.Queue()
        jobs = jobs_for(req, [prompt], [[]], req.max_completion_tokens or req.max_tokens,
                        CHAT_TEMPERATURE if req.temperature is None else req.temperature,
                        CHAT_TOP_P if req.top_p is None else req.top_p, emitter(events))
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if req.stream:
            return await respond(request, jobs, events, True, req.n, {**head, "object": "chat.completion.chunk"},
                                 lambda i, text, reason: {"index": i, "delta": {"content": text} if text else {},
                                                          "finish_reason": reason},
                                 first=[{"index": i, "delta": {"role": "assistant", "content": ""},
                                         "finish_reason": None} for i in range(req.n)])
        return await respond(request, jobs, events, False, req.n, {**head, "object": "chat.completion"},
                             lambda i, text, reason: {"index": i, "message": {"role": "assistant", "content": text},
                                                      "finish_reason": reason})

    return app
