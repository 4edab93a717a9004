"""`generate` and `chat` commands on a tiny random checkpoint saved in HF layout, with the session's tokenizer:
in-process through `main([...])`, and once through `python -m llama_jax chat` with piped stdin."""

import io
import os
import subprocess
import sys

import pytest
from random_checkpoint import save_random_checkpoint

import llama_jax
from llama_jax.chat import encode_dialog
from llama_jax.cli import main
from llama_jax.config import LlamaConfig
from llama_jax.inference.chat_session import HELP, PROMPT
from llama_jax.inference.text import complete

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAT_LINES = ["Hello there", "How are you?", "/reset", "How are you?", "/exit", "never read"]
CHAT_ARGS = ["--temperature", "0", "--max-new-tokens", "12", "--system", "Be brief."]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000, multiple_of=32, max_seq_len=2048)
    return save_random_checkpoint(cfg, tmp_path_factory.mktemp("hf1000"))


@pytest.mark.e2e
def test_generate_streams_the_greedy_continuation(checkpoint, tokenizer_1k, capsys):
    prompt = "It was a fine morning and"
    args = ["generate", "--checkpoint", str(checkpoint), "--tokenizer", str(tokenizer_1k), "--prompt", prompt,
            "--max-new-tokens", "20"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    model, tok = llama_jax.load_pretrained(checkpoint), llama_jax.Tokenizer(tokenizer_1k)
    (expected,) = llama_jax.generate_text(model, tok, [prompt], max_new_tokens=20)
    assert len(expected) > 20
    assert printed == prompt + expected + "\n"
    assert tok.decode(tok.encode(prompt) + llama_jax.generate(model, [tok.encode(prompt, bos=True)],
                                                               max_new_tokens=20)[0]) == prompt + expected


def test_generate_rejects_a_prompt_longer_than_the_context(checkpoint, tokenizer_1k, capsys):
    args = ["generate", "--checkpoint", str(checkpoint), "--tokenizer", str(tokenizer_1k), "--prompt", "a b " * 2100]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: prompt 0 has") and "context is 2048" in err and "\n" not in err


def test_missing_tokenizer_is_one_line(checkpoint, tmp_path, capsys):
    args = ["generate", "--checkpoint", str(checkpoint), "--tokenizer", str(tmp_path / "nope.model"), "--prompt", "a"]
    assert main(args) == 2
    assert capsys.readouterr().err == f"error: tokenizer model not found: {tmp_path / 'nope.model'} " \
                                      "(pass a sentencepiece .model file)\n"


def expected_chat_transcript(checkpoint, tokenizer_1k) -> str:
    """What the chat session must print for CHAT_LINES, built from `complete` on the dialogs it should keep."""
    model, tok = llama_jax.load_pretrained(checkpoint), llama_jax.Tokenizer(tokenizer_1k)

    def reply(dialog):
        ids = encode_dialog(tok, [{"role": "system", "content": "Be brief."}, *dialog])
        return complete(model, tok, [ids], context_tokens=0, max_new_tokens=12)[0]

    first = reply([{"role": "user", "content": "Hello there"}])
    second = reply([{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "How are you?"}])
    fresh = reply([{"role": "user", "content": "How are you?"}])
    assert second != fresh  # the history changes the answer, so the transcript can tell them apart
    return (HELP + PROMPT + first + "\n" + PROMPT + second + "\n" + PROMPT + "(history cleared)\n"
            + PROMPT + fresh + "\n" + PROMPT + "\n")


@pytest.mark.e2e
def test_chat_keeps_history_resets_and_exits(checkpoint, tokenizer_1k, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(CHAT_LINES) + "\n"))
    assert main(["chat", "--checkpoint", str(checkpoint), "--tokenizer", str(tokenizer_1k), *CHAT_ARGS]) == 0
    assert capsys.readouterr().out == expected_chat_transcript(checkpoint, tokenizer_1k)


@pytest.mark.e2e
def test_chat_command_on_piped_stdin(checkpoint, tokenizer_1k):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    run = subprocess.run(
        [sys.executable, "-m", "llama_jax", "chat", "--checkpoint", str(checkpoint), "--tokenizer", str(tokenizer_1k),
         *CHAT_ARGS], input="\n".join(CHAT_LINES) + "\n", capture_output=True, text=True, env=env, cwd=REPO,
        timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected_chat_transcript(checkpoint, tokenizer_1k)
