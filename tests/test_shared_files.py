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


@pytest.mark.parametrize("ci", ["true", ""], ids=["CI=true", "CI unset"])
def test_every_file_that_reads_shared_fails_without_it(tmp_path, ci):
    """The data tests read ../shared through fixtures (its TFDS copy, the raw text, the 32k tokenizer), the e2e
    download test included: each of them fails too, none skips."""
    env = dict(os.environ, CI=ci, LLAMA_JAX_SHARED=str(tmp_path / "no_shared"))
    files = [str(TESTS / name) for name in ("test_data.py", "test_dataset_download.py", "test_tokenizer.py")]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-m", "shared", "-rA", *files]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=TESTS.parent, timeout=600)
    assert result.returncode == 1, result.stdout
    assert "4 failed," in result.stdout and " passed" not in result.stdout, result.stdout
    assert "skipped" not in result.stdout and "error" not in result.stdout.lower()
    for name in ("test_data.py::test_real_tiny_shakespeare_copy_is_the_whole_text",
                 "test_dataset_download.py::test_recipe_without_the_dataset_fails_fast_on_every_host"):
        assert f"FAILED tests/{name}" in result.stdout, result.stdout
    assert f"missing {tmp_path / 'no_shared' / 'data' / 'tinyshakespeare.txt'}" in result.stdout
