"""`serve`: the official openai client against a live server on 127.0.0.1; greedy outputs equal `generate`'s."""

import asyncio
import dataclasses
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
import uvicorn
from flax import nnx

from llama_jax import Llama, LlamaConfig
from llama_jax.chat import encode_dialog
from llama_jax.inference.cache import init_cache
from llama_jax.inference.generate import generate
from llama_jax.inference.load import load_sharded
from llama_jax.inference.text import continuation
from llama_jax.serving import engine as engine_module
from llama_jax.serving.api import create_app
from llama_jax.serving.engine import BatchingConfig, Engine, Event, Job, QueueFull
from tiny_lm import TEXT, make_tiny_lm

MAX_SEQ_LEN = 64
REPO = Path(__file__).resolve().parents[1]


def _start(app) -> tuple[uvicorn.Server, threading.Thread, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"
        time.sleep(0.05)
    raise RuntimeError("server did not start within 10 s")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    _, _, model, tok = make_tiny_lm(tmp_path_factory.mktemp("serve"), max_seq_len=MAX_SEQ_LEN)
    engine = Engine(model, tok, BatchingConfig(max_batch=32, max_queue=40, batch_wait_ms=50)).start()
    server, thread, url = _start(create_app(engine, "tiny"))
    yield SimpleNamespace(url=url, model=model, tok=tok, engine=engine,
                          client=openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120))
    server.should_exit = True
    thread.join(timeout=10)
    engine.close()


def _expected(live, prompt_ids, max_tokens, context) -> str:
    new = generate(live.model, [prompt_ids], max_new_tokens=max_tokens, eos_id=live.tok.eos_id)[0]
    return continuation(live.tok, context, new)


@pytest.mark.e2e
def test_completion_and_chat_equal_generate(live):
    ids = live.tok.encode("The cat sat", bos=True)
    got = live.client.completions.create(model="tiny", prompt="The cat sat", max_tokens=12, temperature=0)
    assert got.choices[0].text == _expected(live, ids, 12, ids[-1:])
    assert got.usage.prompt_tokens == len(ids) and got.choices[0].finish_reason in ("stop", "length")

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is Paris?"}]
    chat = live.client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert chat.choices[0].message.content == _expected(live, encode_dialog(live.tok, messages), 10, [])
    assert chat.choices[0].message.role == "assistant"
    assert [m.id for m in live.client.models.list().data] == ["tiny"]


@pytest.mark.e2e
def test_streaming_equals_generate_and_stop_sequences_cut(live):
    ids = live.tok.encode("Once upon a time", bos=True)
    want = _expected(live, ids, 16, ids[-1:])
    pieces = [c.choices[0].text for c in live.client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=16, temperature=0, stream=True)]
    assert "".join(pieces) == want and len(pieces) > 2

    messages = [{"role": "user", "content": "Tell me about the sea."}]
    chunks = list(live.client.chat.completions.create(model="tiny", messages=messages, max_tokens=16,
                                                      temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == _expected(live, encode_dialog(live.tok, messages), 16, [])
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")

    stop = want[4:6]
    cut = live.client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16, temperature=0,
                                         stop=[stop])
    assert cut.choices[0].text == want[:want.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in live.client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=16, temperature=0, stop=stop, stream=True))
    assert streamed == cut.choices[0].text


@pytest.mark.e2e
def test_n_choices_are_the_requests_with_seeds_seed_to_seed_plus_n(live):
    got = live.client.completions.create(model="tiny", prompt="The cat sat", max_tokens=10, temperature=0.9, seed=5,
                                         n=3)
    alone = [live.client.completions.create(model="tiny", prompt="The cat sat", max_tokens=10, temperature=0.9,
                                            seed=5 + k).choices[0].text for k in range(3)]
    assert [c.index for c in got.choices] == [0, 1, 2] and [c.text for c in got.choices] == alone
    assert len(set(alone)) == 3 and got.usage.prompt_tokens == len(live.tok.encode("The cat sat", bos=True))

    messages = [{"role": "user", "content": "Where is Paris?"}]
    chunks = list(live.client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                      n=2, stream=True))
    texts = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i) for i in (0, 1)}
    assert texts[0] == texts[1] == _expected(live, encode_dialog(live.tok, messages), 8, [])
    assert sorted(c.choices[0].index for c in chunks if c.choices[0].delta.role == "assistant") == [0, 1]

    too_many = httpx.post(live.url + "/v1/completions", json={"model": "tiny", "prompt": ["a", "b"], "n": 21})
    assert too_many.status_code == 400
    assert too_many.json()["error"]["message"] == ("2 prompt(s) x n=21 is 42 sequences, more than this server "
                                                   "queues (40); lower n or send fewer prompts")


@pytest.mark.e2e  # ~60 s on the loaded 2-core machine: kept out of the default tier's budget
def test_32_concurrent_streaming_clients_get_generates_outputs(live):
    prompts = [f"{TEXT[i % len(TEXT)][: 8 + 3 * i]}" for i in range(32)]  # 32 different prompts and lengths
    client = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=300)

    async def one(prompt: str) -> tuple[str, str]:
        stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0,
                                                 stream=True)
        text, reason = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def all_clients():
        return await asyncio.gather(*(one(p) for p in prompts))

    before = httpx.get(live.url + "/health").json()
    results = asyncio.run(all_clients())
    after = httpx.get(live.url + "/health").json()
    assert after["batched_requests"] - before["batched_requests"] == 32
    assert after["batches"] - before["batches"] <= 8  # requests decoded together, not one by one
    for prompt, (text, reason) in zip(prompts, results):
        ids = live.tok.encode(prompt, bos=True)
        assert text == _expected(live, ids, 20, ids[-1:]), prompt
        assert reason in ("stop", "length")


@pytest.mark.e2e
def test_bad_requests_get_4xx_with_a_message_and_serving_continues(live):
    url = live.url + "/v1/completions"
    cases = [
        (httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400, "json"),
        (httpx.post(url, json={"model": "gpt-9", "prompt": "hi"}), 404, "gpt-9"),
        (httpx.post(url, json={"model": "tiny", "prompt": "hi", "max_tokens": -3}), 400, "max_tokens"),
        (httpx.post(url, json={"model": "tiny", "prompt": "the sea " * 60}), 400, "context"),
        (httpx.post(url, json={"model": "tiny", "prompt": "hi", "temperature": -1}), 400, "temperature"),
        (httpx.post(live.url + "/v1/chat/completions",
                    json={"model": "tiny", "messages": [{"role": "assistant", "content": "hi"}]}), 400, "user"),
    ]
    for response, status, word in cases:
        assert response.status_code == status, response.text
        assert word in response.json()["error"]["message"].lower()
    ok = httpx.post(url, json={"model": "tiny", "prompt": "The cat", "max_tokens": 3, "temperature": 0}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 3
    assert httpx.get(live.url + "/health").json()["status"] == "ok"


@pytest.mark.e2e
def test_full_queue_is_503_and_a_disconnect_frees_its_slot(live):
    engine = Engine(live.model, live.tok, BatchingConfig(max_batch=1, max_queue=1))  # never started: jobs wait
    server, thread, url = _start(create_app(engine, "tiny"))
    try:
        body = {"model": "tiny", "prompt": "The cat", "max_tokens": 4}

        def waiting_client():
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url + "/v1/completions", json=body, timeout=2.0)

        waiter = threading.Thread(target=waiting_client)
        waiter.start()
        for _ in range(100):
            if engine.waiting == 1:
                break
            time.sleep(0.05)
        busy = httpx.post(url + "/v1/completions", json=body, timeout=10)
        assert busy.status_code == 503 and "busy" in busy.json()["error"]["message"]
        waiter.join()
        for _ in range(100):  # the server notices the closed connection within DISCONNECT_POLL_S
            if httpx.get(url + "/health").json()["waiting"] == 0:
                break
            time.sleep(0.05)
        assert httpx.get(url + "/health").json()["waiting"] == 0
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.mark.e2e
def test_a_client_leaving_mid_stream_ends_its_row(live, monkeypatch):
    ids = live.tok.encode("Water boils", bos=True)
    max_tokens = MAX_SEQ_LEN - len(ids)
    assert len(generate(live.model, [ids], max_new_tokens=max_tokens, eos_id=live.tok.eos_id)[0]) == max_tokens
    jobs = []
    submit = live.engine.submit
    monkeypatch.setattr(live.engine, "submit", lambda job: (jobs.append(job), submit(job))[1])
    body = {"model": "tiny", "prompt": "Water boils", "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=60) as response:
        assert next(response.iter_lines()).startswith("data: ")  # the first token arrived; now hang up
    for _ in range(200):
        if jobs[0].finished and httpx.get(live.url + "/health").json()["running"] == 0:
            break
        time.sleep(0.05)
    assert jobs[0].cancelled and jobs[0].finished and jobs[0].tokens < max_tokens


def test_engine_queue_bound_and_cancel():
    engine = Engine(SimpleNamespace(cfg=SimpleNamespace(max_seq_len=32)), None, BatchingConfig(max_queue=2))
    jobs = [Job([1, 2], 4, lambda e: None) for _ in range(3)]
    engine.submit(jobs[0])
    engine.submit(jobs[1])
    with pytest.raises(QueueFull, match="max_queue 2"):
        engine.submit(jobs[2])
    engine.cancel(jobs[0])
    engine.submit(jobs[2])
    assert engine.waiting == 2


def _record_readmits(monkeypatch) -> list[tuple[int, int, int]]:
    """(ids run, slot, source slot) of every prompt the engine readmits from then on."""
    runs, readmit_jit = [], engine_module.readmit_jit

    def readmit(graphdef, params, slots, tokens, row, source, *args, **kwargs):
        runs.append((tokens.shape[1], int(row), int(source)))
        return readmit_jit(graphdef, params, slots, tokens, row, source, *args, **kwargs)

    monkeypatch.setattr(engine_module, "readmit_jit", readmit)
    return runs


def _one_by_one(model: Llama, tok, turns: list[tuple[list[int], int]], **sampling) -> list[str]:
    """The texts a two-slot engine streams for requests (ids, max_tokens) sent one after the other, each once the
    last has ended (greedy unless `sampling` says otherwise)."""
    engine, texts = Engine(model, tok, BatchingConfig(max_batch=2, batch_wait_ms=0)).start(), []
    try:
        for ids, max_tokens in turns:
            pieces, done = [], threading.Event()
            engine.submit(Job(ids, max_tokens, lambda e, pieces=pieces, done=done: (
                pieces.append(e.text), e.finish_reason is not None and done.set()), context=tuple(ids[-1:]),
                              **sampling))
            assert done.wait(120)
            texts.append("".join(pieces))
    finally:
        engine.close()
    return texts


def _lone_request(model: Llama, tok, ids: list[int], max_tokens: int, **sampling) -> str:
    return _one_by_one(model, tok, [(ids, max_tokens)], **sampling)[0]


def _generated(model: Llama, tok, ids: list[int], max_tokens: int) -> str:
    """`generate`'s greedy continuation of `ids`, as the engine streams it."""
    return continuation(tok, ids[-1:], generate(model, [ids], max_new_tokens=max_tokens, eos_id=tok.eos_id)[0])


def test_the_engine_serves_a_model_sharded_as_serve_loads_it(tmp_path, monkeypatch):
    """`serve` shards the model over every device (`load_sharded`); on the 8-device test mesh (fsdp 4 x tensor 2) a
    request, and a dialog's next turn that reuses its slot, equal `generate`'s greedy text on that model."""
    hf, _, _, tok = make_tiny_lm(tmp_path, max_seq_len=MAX_SEQ_LEN)
    model = load_sharded(hf, tensor=2)
    assert dict(model.tok_embeddings[...].sharding.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    runs = _record_readmits(monkeypatch)
    first = tok.encode(TEXT[2], bos=True)
    second = first + generate(model, [first], max_new_tokens=4, eos_id=tok.eos_id)[0][:-1] + tok.encode("Rome")
    turns = [(first, 4), (second, 12)]
    assert _one_by_one(model, tok, turns) == [_generated(model, tok, *turn) for turn in turns]
    assert runs == [(16, 0, 0)] and len(second) > 16  # the turn ran the 16-id bucket of what it added, in slot 0


def test_engine_steps_a_tied_model_as_generate_does(tmp_path, monkeypatch):
    """The engine multiplies every step by its model's `decode_head` (a `[dim, vocab]` copy of a tied table, made
    once per run); greedy outputs still equal `generate`'s."""
    _, _, untied, tok = make_tiny_lm(tmp_path, max_seq_len=MAX_SEQ_LEN)
    model = Llama(dataclasses.replace(untied.cfg, tie_embeddings=True), rngs=nnx.Rngs(1))
    heads = []

    def step(graphdef, params, slots, head, sampled):
        heads.append(None if head is None else head.shape)
        return engine_module._step(graphdef, params, slots, head, sampled)

    monkeypatch.setattr(engine_module, "step_jit", jax.jit(step, static_argnames=("sampled",)))
    ids = tok.encode("The cat sat", bos=True)
    new = generate(model, [ids], max_new_tokens=12, eos_id=tok.eos_id)[0]
    assert _lone_request(model, tok, ids, 12) == continuation(tok, ids[-1:], new)
    assert heads and set(heads) == {(model.cfg.dim, model.cfg.vocab_size)}  # traced with the copy


def test_a_request_for_the_rest_of_the_context_steps_over_the_context_and_a_quarter(tmp_path, monkeypatch):
    """A request's columns are its prompt and max_tokens (its prompt's left padding may leave the window when it
    shifts): a chat client's default max_tokens, the rest of a 128-token context, steps over 128 + 32 columns, where
    counting the padding to its 32-id bucket as well stepped over 256 + 64; the text still equals `generate`'s."""
    _, _, model, tok = make_tiny_lm(tmp_path, max_seq_len=128)
    ids = tok.encode(TEXT[1], bos=True)[:20]
    columns, step_jit = [], engine_module.step_jit

    def step(graphdef, params, slots, head, sampled):
        columns.append((slots.cache.slots, int(slots.cache.index)))
        return step_jit(graphdef, params, slots, head, sampled=sampled)

    monkeypatch.setattr(engine_module, "step_jit", step)
    new = generate(model, [ids], max_new_tokens=128 - len(ids), eos_id=tok.eos_id)[0]
    assert _lone_request(model, tok, ids, 128 - len(ids)) == continuation(tok, ids[-1:], new)
    assert {width for width, _ in columns} == {160}
    assert len(new) > 40 and any(b < a for (_, a), (_, b) in zip(columns, columns[1:]))  # the window shifted


@pytest.mark.e2e
def test_benchmark_script_runs_the_cli_server(tmp_path):
    """experiments/bench_serve.py, shortened: `python -m llama_jax serve` in a subprocess under 1 and 4 clients,
    sampling."""
    make_tiny_lm(tmp_path)
    result = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "bench_serve.py"), "--tokenizer", str(tmp_path / "tok.model"),
         "--shape", "tiny", "--concurrency", "1", "4", "--max-tokens", "4", "--prompt-words", "6", "--rounds", "1",
         "--warmup-rounds", "1", "--temperature", "0.8", "--top-p", "0.9"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[0].endswith("temperature 0.8, top_p 0.9")
    rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith("| 1 |") or
            line.startswith("| 4 |")]
    assert [int(r[1]) for r in rows] == [1, 4]
    for r in rows:
        requests_per_s, tokens_per_s, p50, p99 = map(float, r[2:6])
        # at most 4 tokens per request; tokens/s is printed rounded to the unit, requests/s to 0.01
        assert requests_per_s > 0 and 0 < tokens_per_s <= 4 * (requests_per_s + 0.005) + 0.5 and p99 >= p50 > 0


@pytest.mark.e2e
def test_requests_join_a_running_batch_and_match_generate(live):
    """Continuous batching: requests submitted while another decodes join it at the next step (the short one
    finishes first, not after it), one of them needing a wider cache window, past window shifts; every greedy
    output still equals `generate`'s."""
    engine = Engine(live.model, live.tok, BatchingConfig(max_batch=4, batch_wait_ms=0)).start()
    prompts = ["Water boils", "The cat sat on the mat and", "Paris", "Once upon a time there was"]
    max_tokens = [44, 12, 50, 40]  # windows: 16-token prompt bucket + 44 -> 64 columns (+16 spare); + 50 -> 128
    texts, done, jobs, order = [[] for _ in prompts], [threading.Event() for _ in prompts], {}, []
    joins = {1: 3, 2: 8}  # request 1 arrives once the long request 0 has decoded 3 tokens, request 2 after 8

    def job(i: int) -> Job:
        ids = live.tok.encode(prompts[i], bos=True)

        def emit(event) -> None:
            texts[i].append(event.text)
            for j, after in joins.items():  # runs on the engine thread, between steps
                if i == 0 and j not in jobs and jobs[0].tokens >= after:
                    engine.submit(job(j))
            if event.finish_reason is not None:
                order.append(i)
                done[i].set()
                if i == 0:
                    engine.submit(job(3))  # joins request 2

        jobs[i] = Job(ids, max_tokens[i], emit, context=tuple(ids[-1:]))
        return jobs[i]

    try:
        engine.submit(job(0))
        assert all(d.wait(120) for d in done)
    finally:
        engine.close()
    assert order == [1, 0, 2, 3] and engine.batches == 4
    for i, prompt in enumerate(prompts):
        ids = live.tok.encode(prompt, bos=True)
        assert "".join(texts[i]) == _expected(live, ids, max_tokens[i], ids[-1:]), prompt


def test_a_continuing_request_reuses_its_slots_cache_and_matches_generate(tmp_path, monkeypatch):
    """A dialog's next request takes the slot that holds its last prompt and reply and runs only the ids it adds
    (a 16-id bucket, not the whole prompt), while a long request decodes beside it past a window shift; every
    output still equals `generate`'s, and a sampled turn equals the same request admitted afresh."""
    _, _, model, tok = make_tiny_lm(tmp_path)
    runs = []

    def readmit(graphdef, params, slots, tokens, row, source, held_from, *args,
                readmit_jit=engine_module.readmit_jit, **kwargs):
        assert source == row  # the slot that holds the dialog
        runs.append((tokens.shape[1], int(row), int(held_from), int(slots.cache.index)))
        return readmit_jit(graphdef, params, slots, tokens, row, source, held_from, *args, **kwargs)

    monkeypatch.setattr(engine_module, "readmit_jit", readmit)

    def reply(ids: list[int]) -> list[int]:
        return generate(model, [ids], max_new_tokens=4, eos_id=tok.eos_id)[0]

    turns = [tok.encode(TEXT[0], bos=True)]
    for message in ["Paris is", "Water", "The cat", "A question"]:
        turns.append(turns[-1] + reply(turns[-1]) + tok.encode(message))
    sampled = dict(temperature=0.8, seed=5)  # the last turn's
    long_prompt = tok.encode(TEXT[1], bos=True)
    texts, finished, submit_at = [[] for _ in turns], threading.Event(), [2, 10, 30, 50, 70]
    asked, long_text, engine = [], [], Engine(model, tok, BatchingConfig(max_batch=2, batch_wait_ms=0))

    def turn_emit(i: int) -> Callable[[Event], None]:
        return lambda event: texts[i].append(event.text)

    def long_emit(event: Event) -> None:  # on the engine thread, between steps: turn i joins at a fixed step
        long_text.append(event.text)
        i = len(asked)
        if i < len(turns) and long_job.tokens >= submit_at[i] and (i == 0 or asked[-1].finished):
            asked.append(Job(turns[i], 4, turn_emit(i), **(sampled if i == len(turns) - 1 else {})))
            engine.submit(asked[-1])
        if event.finish_reason is not None:
            finished.set()

    long_job = Job(long_prompt, 110, long_emit)
    engine.start().submit(long_job)
    try:
        assert finished.wait(120)
    finally:
        engine.close()
    assert len(asked) == len(turns) and all(job.finished for job in asked)
    assert "".join(long_text) == continuation(tok, [], generate(model, [long_prompt], 110, eos_id=tok.eos_id)[0])
    for i, ids in enumerate(turns[:-1]):
        assert "".join(texts[i]) == continuation(tok, [], reply(ids)), i
    assert [(t, row) for t, row, _, _ in runs] == [(16, 1)] * 4  # every later turn ran 16 of its 39-70 ids
    assert any(b[3] < a[3] for a, b in zip(runs, runs[1:]))  # the window shifted between two turns

    fresh_texts, fresh = [], Engine(model, tok, BatchingConfig(max_batch=2, batch_wait_ms=0)).start()
    done = threading.Event()
    try:
        fresh.submit(Job(turns[-1], 4, lambda e: (fresh_texts.append(e.text), e.finish_reason and done.set()),
                         **sampled))
        assert done.wait(120)
    finally:
        fresh.close()
    assert "".join(texts[-1]) == "".join(fresh_texts) and len(runs) == 4


def test_a_dialogs_next_turn_on_an_idle_engine_keeps_its_slot_when_the_window_grows(tmp_path, monkeypatch):
    """The engine is idle when a chat client sends its next turn, which needs a wider window than the first: the
    cache grows on the left, keeping the slot's dialog, and only the added ids run. Starting afresh there (as an idle
    engine otherwise does) dropped the dialog while the turn still ran only its last ids: the reply was garbage."""
    _, _, model, tok = make_tiny_lm(tmp_path, max_seq_len=128)
    runs = _record_readmits(monkeypatch)
    first = tok.encode(TEXT[4], bos=True)
    reply = generate(model, [first], max_new_tokens=4, eos_id=tok.eos_id)[0]
    second = first + reply + tok.encode(TEXT[1])  # 4 + 37 ids fit 64 columns; this turn + 40 needs 128
    assert len(first) + 4 <= 64 < len(second) + 40 <= 128
    turns = [(first, 4), (second, 40)]
    assert _one_by_one(model, tok, turns) == [_generated(model, tok, *turn) for turn in turns]
    assert runs == [(64, 0, 0)] and len(second) > 64  # the turn ran the 64-id bucket of what it added, in slot 0


@pytest.mark.e2e  # ~10 s (18 requests and their `generate` references): kept out of the default tier's budget
def test_six_chat_clients_taking_turns_all_get_generates_replies(tmp_path):
    """A seeded mix of what the tests around take one at a time: six clients in dialog, each round sending its next
    turn (its last prompt, the reply, a few more ids: held by a free slot, or copied from another client's) or
    starting afresh, three together on an idle engine and three joining at the first one's second token, with
    max_tokens that grow the window, make it shift or leave it. Which slot and step each request gets varies with
    thread timing; every greedy text must equal `generate`'s whatever they are (an idle engine dropping a held dialog
    while its next turn ran only its last ids, fixed above, failed it at each of five seeds tried)."""
    _, _, model, tok = make_tiny_lm(tmp_path, max_seq_len=128)
    rng, replies = np.random.default_rng(0), {}

    def reply(ids: list[int], max_tokens: int) -> list[int]:
        """`generate`'s reply, run once per request: the next turn and the final check both read it."""
        key = (tuple(ids), max_tokens)
        if key not in replies:
            replies[key] = generate(model, [ids], max_new_tokens=max_tokens, eos_id=tok.eos_id)[0]
        return replies[key]

    def turn(last: tuple[list[int], int] | None) -> tuple[list[int], int]:
        text = TEXT[rng.integers(len(TEXT))]
        ids = last[0] + reply(*last)[:-1] + tok.encode(text[:rng.integers(3, 20)]) if last else []
        if not 0 < len(ids) <= 96:
            ids = tok.encode(text[:rng.integers(5, len(text))], bos=True)
        return ids, int(min(rng.choice([4, 12, 30]), 128 - len(ids)))

    engine = Engine(model, tok, BatchingConfig(max_batch=8, batch_wait_ms=0)).start()
    sent, texts, wave = [], [], [None] * 6
    try:
        for _ in range(3):
            wave = [turn(last) for last in wave]
            done, jobs, first = [threading.Event() for _ in wave], [], len(sent)

            def emit(i: int, event: Event) -> None:
                texts[first + i].append(event.text)
                if i == 0 and (jobs[0].tokens >= 2 or event.finish_reason) and len(jobs) == 3:
                    for k in range(3, 6):  # on the engine thread, between steps
                        jobs.append(Job(*wave[k], lambda e, k=k: emit(k, e), context=tuple(wave[k][0][-1:])))
                        engine.submit(jobs[-1])
                if event.finish_reason is not None:
                    done[i].set()

            texts += [[] for _ in wave]
            jobs += [Job(*wave[i], lambda e, i=i: emit(i, e), context=tuple(wave[i][0][-1:])) for i in range(3)]
            for job in jobs[:3]:
                engine.submit(job)
            assert all(d.wait(120) for d in done)
            sent += wave
    finally:
        engine.close()
    for (ids, max_tokens), text in zip(sent, texts):
        assert "".join(text) == continuation(tok, ids[-1:], reply(ids, max_tokens)), (ids, max_tokens)


def test_requests_sharing_a_prefix_copy_it_from_the_slot_that_holds_it(tmp_path, monkeypatch):
    """Three samples of one prompt arriving together (a request with `n` = 3) prefill it once: the second and third
    copy the first's slot and run 16 of its ids; a request extending the prompt, sent while the first decodes, copies
    it from that busy slot. Greedy texts equal `generate`'s; each sampled one equals the same request alone."""
    _, _, model, tok = make_tiny_lm(tmp_path)
    prompt = tok.encode(TEXT[5], bos=True)[:40]
    longer = prompt + tok.encode(TEXT[2])[:10]
    runs = _record_readmits(monkeypatch)
    engine = Engine(model, tok, BatchingConfig(max_batch=4, batch_wait_ms=2000)).start()
    texts, done = [[] for _ in range(4)], [threading.Event() for _ in range(4)]

    def emit(i: int) -> Callable[[Event], None]:
        def on_event(event: Event) -> None:
            texts[i].append(event.text)
            if i == 0 and jobs[0].tokens == 5:  # on the engine thread, between steps: the first is decoding
                engine.submit(jobs[3])
            if event.finish_reason is not None:
                done[i].set()
        return on_event

    sampled = [dict(temperature=0.9, seed=1), dict(temperature=0.9, seed=2)]
    jobs = [Job(prompt, 30, emit(0), context=tuple(prompt[-1:])),
            *(Job(prompt, 30, emit(i + 1), context=tuple(prompt[-1:]), **kw) for i, kw in enumerate(sampled)),
            Job(longer, 12, emit(3), context=tuple(longer[-1:]))]
    try:
        for job in jobs[:3]:
            engine.submit(job)
        assert all(d.wait(120) for d in done)
    finally:
        engine.close()
    assert runs == [(16, 1, 0), (16, 2, 0), (16, 3, 0)]
    for i, (ids, n) in enumerate(((prompt, 30), (longer, 12))):
        new = generate(model, [ids], max_new_tokens=n, eos_id=tok.eos_id)[0]
        assert "".join(texts[3 * i]) == continuation(tok, ids[-1:], new)
    alone = [_lone_request(model, tok, prompt, 30, **kw) for kw in sampled]
    assert ["".join(texts[1]), "".join(texts[2])] == alone and alone[0] != alone[1]


def test_a_continuing_prompt_attends_to_the_columns_it_fits_not_the_whole_window():
    """Readmitting reads, moves, runs and writes back the window's `need` columns before `index`, which hold any
    prompt, not the whole window (the continuing test above checks the outputs); its compiled scores span those."""
    cfg = LlamaConfig.preset("tiny", vocab_size=320, max_seq_len=128, dim=64, n_layers=2)
    graphdef, params = nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))
    rows, width, need = 2, 320, 256
    cache = dataclasses.replace(init_cache(nnx.merge(graphdef, params), rows, width), index=jnp.int32(need))
    slots = engine_module.Slots(cache, jnp.zeros((rows,), jnp.int32), jnp.full((rows,), need, jnp.int32),
                                jnp.zeros((rows,), jnp.float32), jnp.ones((rows,), jnp.float32),
                                jax.vmap(jax.random.key)(jnp.arange(rows)))
    args = (graphdef, params, slots, np.zeros((1, 16), np.int32), np.int32(1), np.int32(1), np.int32(100),
            np.int32(40), np.float32(0), np.float32(1), np.uint32(0))
    text = engine_module.readmit_jit.lower(*args, sampled=False, span=need).compile().as_text()
    # [batch, kv heads, heads per kv head, 16 ids, columns]: 320 columns before
    assert set(re.findall(r"f32\[1,2,2,16,(\d+)\]", text)) == {"256"}


def test_a_slot_runs_a_whole_prompt_once_its_held_ids_left_the_window():
    assert Engine._to_run(list(range(40)), list(range(38)), held_from=3) == 16
    assert Engine._to_run(list(range(40)), list(range(38)), held_from=-1) == 40
    assert Engine._to_run(list(range(40)), list(range(30)) + [99], held_from=0) == 16
    assert Engine._to_run(list(range(40)), [0, 1, 2], held_from=0) == 40  # 37 to run: the 64 bucket is all of it
