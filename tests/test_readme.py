"""The README's examples run: its Python blocks execute in order, and every CLI line in it parses."""

import re
import shlex
from pathlib import Path

import pytest

from llama_jax.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    """Contents of the README's fenced code blocks whose info string is `lang` (fences opened and closed in order)."""
    blocks, current, current_lang = [], None, None
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            if current is None:
                current, current_lang = [], line[3:].strip()
            else:
                if current_lang == lang:
                    blocks.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line)
    return blocks


@pytest.mark.e2e
@pytest.mark.torch_ref  # the Meta export writes .pth files with torch
def test_python_examples_run(tmp_path, monkeypatch):
    blocks = _blocks("python")
    assert blocks, "README has no python examples"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)


def _cli_lines() -> list[str]:
    lines = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            match = re.search(r"python -m llama_jax (.*)$", line.split(" #")[0])
            if match:
                lines.append(match.group(1).strip())
    return lines


@pytest.mark.parametrize("line", _cli_lines())
def test_cli_examples_parse(line):
    args = build_parser().parse_args(shlex.split(line))
    assert callable(args.run)
