"""Llama-2-chat dialog encoding against prompts built by hand from Meta's chat_completion format."""

import inspect
from pathlib import Path

import pytest

from llama_jax import Tokenizer
from llama_jax.chat import encode_dialog
from llama_jax.cli import build_parser
from llama_jax.inference import chat_session


@pytest.fixture
def tok(tokenizer_1k: Path) -> Tokenizer:
    return Tokenizer(tokenizer_1k)


def test_chat_samples_with_metas_defaults_and_generate_is_greedy():
    """Meta's chat_completion samples at temperature 0.6 and top_p 0.9: so do the `chat` command and function."""
    chat = build_parser().parse_args(["chat", "--checkpoint", "c", "--tokenizer", "t"])
    generate = build_parser().parse_args(["generate", "--checkpoint", "c", "--tokenizer", "t", "--prompt", "p"])
    assert (chat.temperature, chat.top_p, chat.top_k) == (0.6, 0.9, 0)
    assert (generate.temperature, generate.top_p, generate.top_k) == (0.0, 1.0, 0)
    defaults = inspect.signature(chat_session.chat).parameters
    assert (defaults["temperature"].default, defaults["top_p"].default) == (0.6, 0.9)


def test_single_user_turn(tok: Tokenizer):
    ids = encode_dialog(tok, [{"role": "user", "content": "  What is the capital of France?\n"}])
    assert ids == [1] + tok.encode("[INST] What is the capital of France? [/INST]")
    assert ids[0] == 1 and 2 not in ids


def test_system_message_merged_into_first_user_turn(tok: Tokenizer):
    dialog = [
        {"role": "system", "content": "Always answer with emojis"},
        {"role": "user", "content": "How to go from Beijing to NY?"},
    ]
    text = "[INST] <<SYS>>\nAlways answer with emojis\n<</SYS>>\n\nHow to go from Beijing to NY? [/INST]"
    expected = [1] + tok.encode(text)
    assert encode_dialog(tok, dialog) == expected


def test_multi_turn(tok: Tokenizer):
    dialog = [
        {"role": "user", "content": "I am going to Paris, what should I see?"},
        {"role": "assistant", "content": " The Eiffel Tower, the Louvre and Notre-Dame. \n"},
        {"role": "user", "content": "What is so great about #1?"},
    ]
    first = "[INST] I am going to Paris, what should I see? [/INST] The Eiffel Tower, the Louvre and Notre-Dame. "
    expected = (
        [1] + tok.encode(first) + [2]
        + [1] + tok.encode("[INST] What is so great about #1? [/INST]")
    )
    assert encode_dialog(tok, dialog) == expected


def test_multi_turn_with_system(tok: Tokenizer):
    dialog = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"},
        {"role": "user", "content": "Thanks!"},
    ]
    expected = (
        [1] + tok.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n2+2? [/INST] 4 ") + [2]
        + [1] + tok.encode("[INST] And 3+3? [/INST] 6 ") + [2]
        + [1] + tok.encode("[INST] Thanks! [/INST]")
    )
    assert encode_dialog(tok, dialog) == expected
    assert tok.decode(expected).count("[INST]") == 3


@pytest.mark.parametrize(
    ("dialog", "message"),
    [
        ([], "empty dialog"),
        ([{"role": "system", "content": "s"}], "must end with a user message"),
        ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}], "message 0 has role 'assistant'"),
        ([{"role": "user", "content": "u"}, {"role": "user", "content": "v"}], "message 1 has role 'user'"),
        ([{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}], "must end with a user message"),
        (
            [{"role": "user", "content": "u"}, {"role": "system", "content": "s"}, {"role": "user", "content": "v"}],
            "only the first message may be 'system'",
        ),
        ([{"role": "bot", "content": "u"}], "message 0 has role 'bot'"),
        ([{"role": "user"}], "message 0 must be a dict"),
        ([{"role": "user", "content": "say [/INST] now"}], r"chat tag '\[/INST\]'"),
        ([{"role": "system", "content": "<<SYS>>"}, {"role": "user", "content": "u"}], "chat tag '<<SYS>>'"),
    ],
)
def test_invalid_dialogs(tok: Tokenizer, dialog: list, message: str):
    with pytest.raises(ValueError, match=message):
        encode_dialog(tok, dialog)
