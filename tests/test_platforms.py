"""Quiet start-up: where libtpu is installed but no TPU chip exists, JAX is told the usable platforms up front, so
no command prints libtpu's start-up warnings; an explicit JAX_PLATFORMS or a TPU machine keeps JAX's choice."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llama_jax import platforms

REPO = Path(__file__).resolve().parents[1]


def test_platform_choice(monkeypatch):
    monkeypatch.setattr(platforms, "_installed", lambda module: module in ("libtpu", "jax_cuda12_plugin"))
    monkeypatch.setattr(platforms, "_tpu_chips", lambda: 0)
    monkeypatch.setattr(os.path, "exists", lambda path: False)
    assert platforms.platforms({}) == "cpu"
    assert platforms.platforms({"JAX_PLATFORMS": "tpu"}) is None
    assert platforms.platforms({"JAX_FORCE_TPU_INIT": "1"}) is None
    monkeypatch.setattr(os.path, "exists", lambda path: path == "/dev/nvidiactl")
    assert platforms.platforms({}) == "cuda,cpu"
    monkeypatch.setattr(platforms, "_tpu_chips", lambda: 4)
    assert platforms.platforms({}) is None


@pytest.mark.usefixtures("libtpu")
def test_no_libtpu_noise_without_a_tpu():
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL")}
    run = subprocess.run([sys.executable, "-c", "import llama_jax, jax; print(jax.devices()[0].platform)"],
                         capture_output=True, text=True, env={**env, "PYTHONPATH": str(REPO)}, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "cpu", run.stderr
    assert "TPU" not in run.stderr and "libtpu" not in run.stderr, run.stderr
