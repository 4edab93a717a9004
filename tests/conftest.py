"""Test setup: 8 simulated CPU devices (set before jax is imported) and paths to ../shared fixtures."""

import os
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    + " --xla_cpu_collective_call_terminate_timeout_seconds=15"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_path(*parts: str) -> Path:
    """A file under ../shared, or skip the test cleanly when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


@pytest.fixture
def tfds_dir() -> Path:
    return shared_path("tensorflow_datasets")


@pytest.fixture
def shakespeare_txt() -> Path:
    return shared_path("data", "tinyshakespeare.txt")


@pytest.fixture
def tokenizer_32k() -> Path:
    return shared_path("tokenizers", "llama_style_32k.model")


@pytest.fixture
def tokenizer_1k() -> Path:
    return shared_path("tokenizers", "botchan_en_bpe_1000.model")
