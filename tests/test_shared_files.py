"""Tests that read ../shared never skip: without the files they fail, naming the missing path, under CI=true or not."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize("ci", ["true", ""], ids=["CI=true", "CI unset"])
def test_missing_shared_files_fail(tmp_path, ci):
    env = dict(os.environ, CI=ci, LLAMA_JAX_SHARED=str(tmp_path / "no_shared"))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-k", "llama_style or chinese",
               str(TESTS / "test_tokenizer.py")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=TESTS.parent, timeout=600)
    assert result.returncode == 1, result.stdout
    assert "2 failed, 2 passed, 4 deselected in" in result.stdout, result.stdout
    assert "skipped" not in result.stdout and "error" not in result.stdout.lower()
    assert f"missing {tmp_path / 'no_shared' / 'tokenizers' / 'llama_style_32k.model'}" in result.stdout
