"""Continuous batching: requests join the running decode batch at step boundaries, into free slots of one KV cache.

One engine thread owns the model and a cache of `max_batch` rows (slots). Each decode step feeds every busy slot's
last token at one shared column `index` (the write position `Llama` takes from a `KVCache`) and samples each slot's
next token with that request's own temperature / top_p / seed, in one jitted call. Between steps, waiting requests
take free slots: each prompt is prefilled (left-padded to a bucketed length, as `generate` does) and its keys/values
are copied into its slot so that they end just before `index`. A slot's positions
count from its first column (`pad`) and columns before it are masked: the math `generate` does for a left-padded row,
so greedy outputs are the same. A slot frees the moment its request ends (EOS, max_tokens, a stop sequence) or its
client leaves; while idle, a new request waits up to `batch_wait_ms` for company so that a burst prefills together.

Prefix reuse: a freed slot keeps the ids its columns hold (prompt and reply), and a request whose prompt begins with
them (a chat client's next turn resends the whole dialog) takes that slot and runs only the ids it adds, rounded up
to a power of two, after the row's columns are moved to end where those begin (`_readmit`); other requests take an
empty slot among the rows stepped now, else the least recently freed, so held dialogs stay while there is room.

Columns (`Window`): the cache is as wide as the longest request needs (prompt + max_tokens, rounded up to a power of
two; its prompt's padding to a bucket fits at admission, since `index` >= that bucket, and is masked, so it may leave
the window later) plus a quarter of that spare, because each decode step reads every column (stories15m on CPU: a
32-row step over 320 columns took 1.9x as long as over 160). `index` starts at `need`, so any prompt fits before it;
on reaching the end, every slot shifts left by the spare columns, which no busy slot still uses (a held dialog whose
first column goes with them is run whole next time). A joiner needing more columns grows the window on the left; an
idle engine starts afresh, dropping what slots held, unless a joiner reuses a slot's ids. Steps run on the first
`bucket(highest busy slot + 1)` slots only (slots are handed out low first; the cache grows by whole rows and
starts afresh when idle, because slicing rows out of a larger cache each step cost more than stepping all of them),
so a lone request does not pay for 32 rows.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax.inference.cache import init_cache, resize_cache
from llama_jax.inference.generate import (MIN_PROMPT_BUCKET, bucket, decode_head_jit, forward_padded, left_pad,
                                          model_mesh, prefill_padded)
from llama_jax.inference.prefix_cache import reusable
from llama_jax.inference.sampling import greedy, sample_rows
from llama_jax.inference.stops import StopStream
from llama_jax.inference.text import TextStream
from llama_jax.model import KVCache, Llama
from llama_jax.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchingConfig:
    """max_batch slots decode together; at most max_queue requests wait; an idle engine waits batch_wait_ms for a
    burst to prefill together."""

    max_batch: int = 32
    max_queue: int = 64
    batch_wait_ms: float = 10.0

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms}")


Admission = tuple[int, "Job", int, int]  # (slot, job, the slot whose ids it reuses, how many of its last ids run)


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
    text: TextStream | None = None  # ids -> text, set by the engine when the job takes a slot
    _stop: StopStream = field(init=False)

    def __post_init__(self) -> None:
        self._stop = StopStream(self.stops)

    def piece(self, text: str) -> None:
        if self.finished:
            return
        released = self._stop.push(text)
        if self._stop.stopped:
            self._end(released, "stop")
        elif released:
            self.emit(Event(text=released))

    def take(self, token: int, eos: int) -> None:
        """The next sampled token: end at EOS or max_tokens, else stream its text (a cancelled job just ends)."""
        if self.cancelled:
            self.finished = True
        elif token == eos:
            self.finish("stop")
        else:
            self.tokens += 1
            self.text.push(token)
            if self.tokens >= self.max_tokens:
                self.finish("length")

    def finish(self, reason: str) -> None:
        """No more tokens: flush held-back text (which may still complete a stop sequence) and send the end."""
        if not self.finished and self.text is not None:
            self.text.finish()
        if not self.finished:
            self._end(self._stop.finish(), reason)

    def _end(self, text: str, reason: str) -> None:
        self.finished = True
        self.emit(Event(text=text, finish_reason=reason, completion_tokens=self.tokens))


@dataclass(frozen=True)
class Window:
    """The cache's columns: room for requests needing up to `need` columns (prompt + max_tokens), plus `shift`
    spare ones; the shared write column `index` stays in [need, width]."""

    need: int

    @classmethod
    def fitting(cls, need: int) -> Window:
        return cls(bucket(need, MIN_PROMPT_BUCKET))  # powers of two: few distinct shapes to compile

    @property
    def shift(self) -> int:
        return self.need // 4  # columns dropped at once when the window is full: one cache copy per need/4 steps

    @property
    def width(self) -> int:
        return self.need + self.shift


@jax.tree_util.register_dataclass
@dataclass
class Slots:
    """The device side of the engine: the shared cache and, per slot, what the next step needs."""

    cache: KVCache  # per layer [slots, kv_heads, window width, head_dim]; index = the shared write column
    token: jax.Array  # [slots] last sampled token
    pad: jax.Array  # [slots] first column of the slot's request (earlier columns are masked)
    temperature: jax.Array  # [slots] float32, 0 = greedy
    top_p: jax.Array  # [slots] float32
    key: jax.Array  # [slots] PRNG keys, split every step


def _sample(slots: Slots, logits: jax.Array, sampled: bool) -> tuple[jax.Array, jax.Array]:
    """Each row's next token from `[rows, vocab]` logits, and the rows' advanced keys. `sampled` False (every row
    greedy) skips the keys' split, top-p and the draw (with the sort and the Gumbel noise they replaced, these
    doubled a 32-row stories15m step on CPU)."""
    if not sampled:
        return greedy(logits), slots.key
    keys = jax.vmap(jax.random.split)(slots.key)
    return sample_rows(logits, keys[:, 1], slots.temperature, slots.top_p), keys[:, 0]


def _step(graphdef: nnx.GraphDef, params: Any, slots: Slots, head: jax.Array | None,
          sampled: bool) -> tuple[Slots, jax.Array]:
    """One decode step for every slot: feed the last tokens at `index`, sample the next ones. Idle slots step too,
    their positions growing past `max_seq_len`, so RoPE computes these rather than reading its bounded table.
    `head`: the model's `decode_head`, made once per server run."""
    model: Llama = nnx.merge(graphdef, params)
    logits, cache = forward_padded(model, slots.token[:, None], slots.pad, slots.cache, head=head)
    token, key = _sample(slots, logits[:, 0], sampled)
    return Slots(cache, token, slots.pad, slots.temperature, slots.top_p, key), token


def _admit(graphdef: nnx.GraphDef, params: Any, slots: Slots, tokens: jax.Array, pad: jax.Array, row: jax.Array,
           temperature: jax.Array, top_p: jax.Array, seed: jax.Array, sampled: bool) -> tuple[Slots, jax.Array]:
    """Prefill one left-padded prompt `[1, P]` and place it in slot `row`, ending at column `index - 1`; return the
    slots and the prompt's first sampled token."""
    model: Llama = nnx.merge(graphdef, params)
    length = tokens.shape[1]
    logits, fresh = prefill_padded(model, tokens, pad, length, model.cfg.max_seq_len)
    new = Slots(fresh, tokens[:, -1], pad, temperature[None], top_p[None], jax.random.key(seed)[None])
    token, key = _sample(new, logits, sampled)
    index = slots.cache.index
    cache = slots.cache.place(fresh, row, index - length)  # keeps the slots' index
    return Slots(cache, *(old.at[row].set(value[0]) for old, value in
                          ((slots.token, token), (slots.pad, index - length + pad), (slots.temperature, new.temperature),
                           (slots.top_p, new.top_p), (slots.key, key)))), token[0]


def _readmit(graphdef: nnx.GraphDef, params: Any, slots: Slots, tokens: jax.Array, row: jax.Array,
             source: jax.Array, held_from: jax.Array, reused: jax.Array, temperature: jax.Array, top_p: jax.Array,
             seed: jax.Array, sampled: bool, span: int) -> tuple[Slots, jax.Array]:
    """Place a prompt in slot `row` whose first `reused` ids slot `source` holds (from column `held_from`): the
    same slot, from its last request, or another one, running or admitted just before, with the same prefix.
    Only its last `T` ids `[1, T]` run; return the slots and the first sampled token.

    The kept keys and values move so they end where the prompt's last `T` ids begin, `T` columns before `index`
    (their positions count from the new first column, as before from the old one). Only the `span` columns before
    `index` are read, run and written back: they hold the whole prompt (`span`, the window's `need`, is at least
    any prompt's length), so the move copies and attention spans those rather than the whole window. What
    the move wraps round lands before the prompt's first column, where the row's mask hides it, and columns after
    the kept ones are overwritten by the `T` ids or lie past `index`, unseen until decoding writes them.
    """
    model: Llama = nnx.merge(graphdef, params)
    t = tokens.shape[1]
    index = slots.cache.index
    first = index - t - reused
    start = index - span
    columns = (start - (first - held_from) + jnp.arange(span)) % slots.cache.slots

    def moved(x: jax.Array, lead: int) -> jax.Array:
        return jnp.take(jax.lax.dynamic_index_in_dim(x, source, axis=lead), columns, axis=lead + 2)

    cache = replace(slots.cache.map(moved), index=span - t)
    mask = (jnp.arange(span) >= first - start)[None, None, :]
    features, cache = model.features(tokens, reused + jnp.arange(t)[None], mask, cache,
                                     positions_below=model.cfg.max_seq_len)
    new = Slots(cache, tokens[:, -1], first[None], temperature[None], top_p[None], jax.random.key(seed)[None])
    token, key = _sample(new, model.logits(features[:, -1:])[:, 0], sampled)
    placed = replace(slots.cache.place(cache, row, start), index=index)
    return Slots(placed, *(old.at[row].set(value[0]) for old, value in
                           ((slots.token, token), (slots.pad, first[None]), (slots.temperature, new.temperature),
                            (slots.top_p, new.top_p), (slots.key, key)))), token[0]


def _resize(slots: Slots, rows: int, start: int, width: int) -> Slots:
    """The first `rows` slots (new ones empty) and columns [start, start + width) of each, zeros where that leaves
    the old window (start < 0 grows it on the left); positions are unchanged: `pad` and `index` move along."""
    add = max(0, rows - slots.token.shape[0])
    resized = resize_cache(slots.cache, rows, start, width)
    index = resized.index

    def rows_of(x: jax.Array, empty: jax.Array) -> jax.Array:
        return jnp.concatenate([x, empty])[:rows]

    return Slots(resized, rows_of(slots.token, jnp.zeros((add,), jnp.int32)),
                 rows_of(slots.pad - start, jnp.full((add,), index, jnp.int32)),
                 rows_of(slots.temperature, jnp.zeros((add,), jnp.float32)),
                 rows_of(slots.top_p, jnp.ones((add,), jnp.float32)),
                 rows_of(slots.key, jax.vmap(jax.random.key)(jnp.arange(add))))


step_jit = jax.jit(_step, static_argnames=("sampled",), donate_argnames=("slots",))
admit_jit = jax.jit(_admit, static_argnames=("sampled",), donate_argnames=("slots",))
readmit_jit = jax.jit(_readmit, static_argnames=("sampled", "span"), donate_argnames=("slots",))
resize_jit = jax.jit(_resize, static_argnames=("rows", "start", "width"))


class Engine:
    """Owns the model and the decode thread; `submit` is safe to call from any thread."""

    def __init__(self, model: Llama, tokenizer: Tokenizer, config: BatchingConfig = BatchingConfig()):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self._waiting: deque[Job] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._busy: list[Job | None] = [None] * config.max_batch  # the request in each slot
        self._held: list[list[int]] = [[] for _ in range(config.max_batch)]  # a free slot's ids, from its `pad`
        self._freed_at = [0] * config.max_batch  # the count of frees when each slot was last freed
        self._frees = 0
        self.batches = 0  # prefill passes so far, and the requests they admitted (their ratio = mean group size)
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

    @property
    def running(self) -> int:
        """Requests decoding now."""
        return sum(job is not None and not job.finished for job in self._busy)

    def submit(self, job: Job) -> None:
        with self._cv:
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFull(f"server busy: {len(self._waiting)} requests already waiting (max_queue "
                                f"{self.config.max_queue}); retry later")
            self._waiting.append(job)
            self._cv.notify_all()

    def cancel(self, job: Job) -> None:
        """The client left: free its waiting place now, or its slot at the next step boundary."""
        job.cancelled = True
        with self._cv:
            if job in self._waiting:
                self._waiting.remove(job)

    def _loop(self) -> None:
        graphdef, params = nnx.split(self.model)
        mesh = model_mesh(params)
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            head = decode_head_jit(graphdef, params)
            slots, window, index = None, Window(0), 0
            while True:
                joining = self._admissions(0 if slots is None else slots.token.shape[0])
                if joining is None:
                    return
                try:
                    if joining or self.running:
                        slots, window, index = self._fit(slots, window, index, joining)
                    if joining:
                        slots = self._prefill(graphdef, params, slots, joining, window)
                    if self.running:
                        if index == window.width:
                            slots = resize_jit(slots, rows=slots.token.shape[0], start=window.shift,
                                               width=window.width)
                            index -= window.shift
                        slots = self._decode(graphdef, params, slots, head)
                        index += 1
                except Exception as err:  # one failed step must not take the server down
                    log.exception("decode failed")
                    self._fail_all(f"generation failed: {err}")
                    slots, window, index = None, Window(0), 0

    def _fit(self, slots: Slots | None, window: Window, index: int, joining: list[Admission]
             ) -> tuple[Slots, Window, int]:
        """Slots for the busy requests and the joining ones: `bucket(highest busy slot + 1)` rows and a window as
        wide as the longest one needs; fresh when idle, else grown (rows at the end, columns on the left), never
        shrunk while busy."""
        max_seq_len = self.model.cfg.max_seq_len
        for _, job, _, _ in joining:
            job.max_tokens = min(job.max_tokens, max_seq_len - len(job.prompt))
        need = max((len(job.prompt) + job.max_tokens for _, job, _, _ in joining), default=0)
        busy = [slot for slot, job in enumerate(self._busy) if job is not None and not job.finished]
        rows = min(bucket(max(busy) + 1, 1), self.config.max_batch)
        joining_slots = {slot for slot, _, _, _ in joining}
        idle = not set(busy) - joining_slots
        # idle, the ids a joiner reuses are the dialog its own free slot holds (a copy from another joiner's slot is
        # prefilled into whichever cache there is): keep the cache for it
        reusing = any(run < len(job.prompt) and source == slot for slot, job, source, run in joining)
        if slots is None or idle and not reusing and (Window.fitting(need), rows) != (window, slots.token.shape[0]):
            window = Window.fitting(need)
            return self._empty_slots(window, rows), window, window.need
        rows = max(rows, slots.token.shape[0])  # no shrinking while busy: fewer shapes to compile
        grown = Window.fitting(need) if need > window.need else window
        extra = grown.width - window.width
        if rows != slots.token.shape[0] or extra:
            slots, index = resize_jit(slots, rows=rows, start=-extra, width=grown.width), index + extra
        return slots, grown, index

    def _admissions(self, rows: int) -> list[Admission] | None:
        """Waiting jobs with the free slots they take (`_choose_slot`, `rows` being stepped now), the slots whose ids
        they reuse and how many of their ids to run; blocks while idle; None once closed."""
        with self._cv:
            for slot, job in enumerate(self._busy):
                if job is not None and (job.finished or job.cancelled):
                    job.finished = True
                    self._busy[slot] = None
                    self._held[slot] = self._fed(job)
                    self._frees += 1
                    self._freed_at[slot] = self._frees
            idle = not self.running
            while idle and not self._waiting and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            if idle:  # a burst that is arriving now prefills together
                deadline = time.monotonic() + self.config.batch_wait_ms / 1000
                while len(self._waiting) < self.config.max_batch and (left := deadline - time.monotonic()) > 0:
                    self._cv.wait(left)
            free = [slot for slot, job in enumerate(self._busy) if job is None]
            joining: list[Admission] = []
            if not (free and self._waiting):  # the common case between two decode steps
                return joining
            holding = [self._held[slot] if job is None else self._fed(job) for slot, job in enumerate(self._busy)]
            while free and self._waiting:
                job = self._waiting.popleft()
                slot, source, run = self._choose_slot(free, job.prompt, rows, holding)
                free.remove(slot)
                holding[slot] = job.prompt  # what its prefill leaves there, for a later joiner with that prefix
                joining.append((slot, job, source, run))
                self._busy[slot] = job
            return joining

    @staticmethod
    def _fed(job: Job) -> list[int]:
        """The ids a busy or just-freed slot's columns hold from its `pad`: the prompt, and every sampled id but the
        last (each was fed back to sample the next)."""
        return job.prompt + (job.text.ids[:-1] if job.text is not None else [])

    def _prefill(self, graphdef: nnx.GraphDef, params: Any, slots: Slots, joining: list[Admission],
                 window: Window) -> Slots:
        """Prefill each joining prompt into its slot and stream its first token. One prompt per call: a burst's
        grouping varies with arrival times, and every group size would be another compile (tens of seconds under
        load, which dominated a 32-client benchmark round when prompts were prefilled in groups). A continuing
        prompt reads the last `window.need` columns: its length fits them, and `index` is never below them."""
        length_cap = self.model.cfg.max_seq_len
        for slot, job, source, run in joining:
            self._held[slot] = []
            sampling = (np.float32(job.temperature), np.float32(job.top_p), np.uint32(job.seed or 0))
            # The source's first column, read after the admissions before (which set their slots'); below 0, what it
            # held has left the window on the left and the whole prompt runs.
            if run < len(job.prompt) and (held_from := np.asarray(slots.pad)[source]) >= 0:
                tokens = np.asarray([job.prompt[len(job.prompt) - run:]], np.int32)
                slots, first = readmit_jit(graphdef, params, slots, tokens, np.int32(slot), np.int32(source),
                                           held_from, np.int32(len(job.prompt) - run), *sampling,
                                           sampled=job.temperature > 0, span=window.need)
            else:
                tokens, pad = left_pad([job.prompt], min(bucket(len(job.prompt), MIN_PROMPT_BUCKET), length_cap))
                slots, first = admit_jit(graphdef, params, slots, tokens, pad, np.int32(slot), *sampling,
                                         sampled=job.temperature > 0)
            job.text = TextStream(self.tokenizer, job.piece, job.context)
            job.take(int(first), self.tokenizer.eos_id)
        self.batches += 1
        self.batched_requests += len(joining)
        return slots

    def _choose_slot(self, free: list[int], prompt: list[int], rows: int,
                     holding: list[list[int]]) -> tuple[int, int, int]:
        """The slot, the slot to reuse ids from and how many ids to run (if those are still in the window).

        The source is the slot whose ids (`holding`: a free slot's kept dialog, a busy slot's prompt and fed ids)
        leave the least of `prompt` to run, a free one on a tie; a free source is taken itself (a dialog's next
        turn). Otherwise the prompt goes to a free slot inside the `rows` stepped now, holding nothing, else the
        least recently freed (so the dialogs held last stay), lowest first, copying what a busy source shares
        with it (a shared system prompt, or another of `n` samples).
        """
        runs = [self._to_run(prompt, ids, 0) for ids in holding]
        source = min(range(len(holding)), key=lambda s: (runs[s], s not in free, s))
        if runs[source] < len(prompt) and source in free:
            return source, source, runs[source]
        slot = min(free, key=lambda s: (s >= rows, bool(self._held[s]), self._freed_at[s], s))
        return slot, source, runs[source]

    @staticmethod
    def _to_run(prompt: list[int], held: list[int], held_from: int) -> int:
        """How many of the prompt's last ids to run, the rest being the slot's: a power of two (one compile per
        bucket), so at most twice what it adds. All of it when the slot holds too little, or what it held has
        left the window on the left (`held_from` < 0)."""
        common = reusable(held, prompt) if held_from >= 0 else 0
        return min(bucket(len(prompt) - common, MIN_PROMPT_BUCKET), len(prompt))

    def _decode(self, graphdef: nnx.GraphDef, params: Any, slots: Slots, head: jax.Array | None) -> Slots:
        """One step for every busy slot; a slot whose job ends is freed at the next boundary."""
        busy = [job for job in self._busy if job is not None and not job.finished]
        slots, tokens = step_jit(graphdef, params, slots, head, sampled=any(job.temperature > 0 for job in busy))
        for job, token in zip(self._busy, np.asarray(tokens).tolist()):
            if job is not None and not job.finished:
                job.take(token, self.tokenizer.eos_id)
        return slots

    def _empty_slots(self, window: Window, n: int) -> Slots:
        self._held = [[] for _ in self._held]
        cache = init_cache(self.model, n, window.width)
        return Slots(replace(cache, index=jnp.int32(window.need)), jnp.zeros((n,), jnp.int32),
                     jnp.full((n,), window.need, jnp.int32), jnp.zeros((n,), jnp.float32), jnp.ones((n,), jnp.float32),
                     jax.vmap(jax.random.key)(jnp.arange(n)))

    def _fail_all(self, message: str) -> None:
        with self._cv:
            for slot, job in enumerate(self._busy):
                if job is not None and not job.finished:
                    job.finished = True
                    job.emit(Event(error=message))
                self._busy[slot] = None
                self._held[slot] = []
