"""Dynamic batching: requests that arrive within a short window decode together in one jitted `generate` call.

One engine thread owns the model. It takes the oldest waiting request, waits up to `batch_wait_ms` for more that can
share its batch (same sampling settings, and every member's `max_tokens` still fits the context beside the longest
prompt), pads the batch to a power of two (so it compiles once per size bucket) and streams each row's tokens out as
text. A request whose client has gone is dropped from the waiting queue at once, stops receiving tokens while its
batch runs, and the batch ends early once every real row is finished, cancelled or stopped by a stop sequence.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from llama_jax.inference.generate import PAD, bucket, generate
from llama_jax.inference.stops import StopStream
from llama_jax.inference.text import TextStream
from llama_jax.model import Llama
from llama_jax.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchingConfig:
    """max_batch rows decode together; at most max_queue requests wait; a batch forms within batch_wait_ms."""

    max_batch: int = 32
    max_queue: int = 64
    batch_wait_ms: float = 10.0

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms}")


class QueueFull(Exception):
    """Every waiting slot is taken; the client should retry later."""


@dataclass(frozen=True)
class Event:
    """What a request's `emit` receives: text pieces, then one final event with finish_reason (or an error)."""

    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | None while streaming
    completion_tokens: int = 0
    error: str | None = None


@dataclass(eq=False)
class Job:
    """One prompt to continue. `emit` is called from the engine thread; `context` decodes in front of the reply."""

    prompt: list[int]
    max_tokens: int
    emit: Callable[[Event], None]
    temperature: float = 0.0
    top_p: float = 1.0
    stops: tuple[str, ...] = ()
    context: tuple[int, ...] = ()
    seed: int = 0
    cancelled: bool = False
    finished: bool = False
    tokens: int = 0
    text: TextStream | None = None  # ids -> text, set by the engine when the job's batch starts
    _stop: StopStream = field(init=False)

    def __post_init__(self) -> None:
        self._stop = StopStream(self.stops)
        if self.temperature == 0.0:
            self.top_p = 1.0  # irrelevant when greedy; lets every greedy request share a batch

    @property
    def sampling_key(self) -> tuple[float, float]:
        return self.temperature, self.top_p

    def piece(self, text: str) -> None:
        if self.finished:
            return
        released = self._stop.push(text)
        if self._stop.stopped:
            self._end(released, "stop")
        elif released:
            self.emit(Event(text=released))

    def finish(self, reason: str) -> None:
        """No more tokens: flush held-back text (which may still complete a stop sequence) and send the end."""
        if not self.finished and self.text is not None:
            self.text.finish()
        if not self.finished:
            self._end(self._stop.finish(), reason)

    def _end(self, text: str, reason: str) -> None:
        self.finished = True
        self.emit(Event(text=text, finish_reason=reason, completion_tokens=self.tokens))


class Engine:
    """Owns the model and the decode thread; `submit` is safe to call from any thread."""

    def __init__(self, model: Llama, tokenizer: Tokenizer, config: BatchingConfig = BatchingConfig()):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self._waiting: deque[Job] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self.running = 0  # rows of the batch now decoding
        self.batches = 0  # batches decoded so far, and the requests they held (their ratio = mean batch size)
        self.batched_requests = 0
        self._thread = threading.Thread(target=self._loop, name="llama_jax-engine", daemon=True)

    def start(self) -> Engine:
        self._thread.start()
        return self

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=60)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, job: Job) -> None:
        with self._cv:
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFull(f"server busy: {len(self._waiting)} requests already waiting (max_queue "
                                f"{self.config.max_queue}); retry later")
            self._waiting.append(job)
            self._cv.notify_all()

    def cancel(self, job: Job) -> None:
        """The client left: free its waiting slot now, or stop its row at the next decode step."""
        job.cancelled = True
        with self._cv:
            if job in self._waiting:
                self._waiting.remove(job)

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self.running = len(batch)
            self.batches += 1
            self.batched_requests += len(batch)
            try:
                self._decode(batch)
            except Exception as err:  # one bad batch must not take the server down
                log.exception("decode failed")
                for job in batch:
                    if not job.finished:
                        job.finished = True
                        job.emit(Event(error=f"generation failed: {err}"))
            self.running = 0

    def _next_batch(self) -> list[Job] | None:
        """The oldest waiting job plus compatible ones that arrive within the wait window; None once closed."""
        with self._cv:
            while not self._waiting and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            deadline = time.monotonic() + self.config.batch_wait_ms / 1000
            batch = [self._waiting.popleft()]
            while True:
                self._take_compatible(batch)
                remaining = deadline - time.monotonic()
                if len(batch) >= self.config.max_batch or remaining <= 0:
                    return batch
                self._cv.wait(remaining)

    def _take_compatible(self, batch: list[Job]) -> None:
        """Move waiting jobs that fit `batch` into it (the caller holds the lock)."""
        for job in list(self._waiting):
            if len(batch) >= self.config.max_batch:
                break
            if job.sampling_key == batch[0].sampling_key and self._fits(batch + [job]):
                self._waiting.remove(job)
                batch.append(job)

    def _fits(self, jobs: Sequence[Job]) -> bool:
        """generate() caps new tokens at context - longest prompt; no member may lose tokens to a longer one."""
        room = self.model.cfg.max_seq_len - max(len(j.prompt) for j in jobs)
        return all(j.max_tokens <= room for j in jobs)

    def _decode(self, batch: list[Job]) -> None:
        eos = self.tokenizer.eos_id
        for job in batch:
            job.text = TextStream(self.tokenizer, job.piece, job.context)
        rows = bucket(len(batch), 1)
        prompts = [job.prompt for job in batch] + [[self.tokenizer.bos_id]] * (rows - len(batch))

        def on_step(tokens: np.ndarray) -> bool:
            for job, token in zip(batch, tokens.tolist()):
                if job.finished or token == PAD:
                    continue
                if job.cancelled:
                    job.finished = True
                elif token == eos:
                    job.finish("stop")
                else:
                    job.tokens += 1
                    job.text.push(token)
                    if not job.finished and job.tokens >= job.max_tokens:
                        job.finish("length")
            return all(job.finished for job in batch)

        generate(self.model, prompts, max_new_tokens=max(job.max_tokens for job in batch),
                 temperature=batch[0].temperature, top_p=batch[0].top_p, eos_id=eos, seed=batch[0].seed,
                 stream=on_step)
        for job in batch:
            job.finish("length")
