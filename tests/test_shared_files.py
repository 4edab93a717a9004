"""Tests that read ../shared never skip: without the files they are deselected (and named), under CI=true they fail."""

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def run_tokenizer_tests(tmp_path: Path, ci: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CI=ci, LLAMA_JAX_SHARED=str(tmp_path / "no_shared"))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-k", "llama_style or chinese",
               str(TESTS / "test_tokenizer.py")]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=TESTS.parent, timeout=600)


def test_missing_shared_files_fail_under_ci_and_are_deselected_elsewhere(tmp_path):
    under_ci = run_tokenizer_tests(tmp_path, "true")
    assert under_ci.returncode == 1, under_ci.stdout
    assert "1 failed, 2 passed, 4 deselected, 1 error" in under_ci.stdout and "skipped" not in under_ci.stdout
    assert f"{tmp_path / 'no_shared' / 'tokenizers' / 'llama_style_32k.model'} is missing" in under_ci.stdout

    elsewhere = run_tokenizer_tests(tmp_path, "")
    assert elsewhere.returncode == 0, elsewhere.stdout
    assert "2 passed, 6 deselected" in elsewhere.stdout and "skipped" not in elsewhere.stdout
    assert "so their tests were deselected" in elsewhere.stdout
