"""Test setup: 8 simulated CPU devices (set before jax is imported), the data the tests need built once per session,
and the few files that only ../shared has.

The session builds its own corpus (generated play text), a 1000-piece tokenizer trained on it and a TFDS
`tiny_shakespeare` prepared from it, so the suite needs nothing outside the repository. Tests marked `shared` check
the real files in ../shared (or `LLAMA_JAX_SHARED`). Without them they never skip: they run and fail, naming the
missing path, with or without `CI=true`. No test skips for a missing tool either (`missing_tool`).
"""

import importlib.util
import os
import tempfile
from pathlib import Path

# LLVM at -O0: the tests' tiny programs compile 2-3x faster on CPU (a sharded forward: 49 s -> 20 s on the loaded
# 2-core machine) and run about as fast; the results agree within every tolerance the tests use.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    + " --xla_cpu_collective_call_terminate_timeout_seconds=15"
    + " --xla_backend_optimization_level=0"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiled programs are kept on disk for the session (and its subprocesses; CI shares one directory across tiers):
# the tests build the same tiny models and train steps many times over. A 1-layer train step's init + first step
# took 20 s compiling and 4.3 s from the cache on the loaded machine.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="llama_jax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402
from corpus import play_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLAMA_JAX_SHARED", REPO.parent / "shared"))
CORPUS_CHARS = 600_000  # TFDS's 5% validation split is then 30,000 characters, about 13,000 tokens


def missing_tool(message: str) -> None:
    """Fail a test whose tool this machine lacks, naming the install command: the README's test command installs
    every tool the suite uses (requirements-dev.txt), so no test skips, under CI=true or not."""
    pytest.fail(message, pytrace=False)


# The ../shared files some tests read, by the fixture that hands each out.
SHARED_FILES = {"tokenizer_32k": ("tokenizers", "llama_style_32k.model"),
                "shared_tfds_dir": ("tensorflow_datasets",),
                "shakespeare_txt": ("data", "tinyshakespeare.txt")}
SHARED_HINT = "(tests marked 'shared' read ../shared, or the folder LLAMA_JAX_SHARED names)"


def shared_needs(item: pytest.Item) -> set[str]:
    """The ../shared fixtures a test uses: by its fixtures, or by name in its marker (`pytest.mark.shared("...")`)."""
    named = [arg for marker in item.iter_markers("shared") for arg in marker.args]
    return SHARED_FILES.keys() & {*getattr(item, "fixturenames", ()), *named}


def shared_path(fixture: str) -> Path:
    """The ../shared file behind `fixture` (its absence fails the test: `pytest_runtest_call`)."""
    return SHARED.joinpath(*SHARED_FILES[fixture])


@pytest.fixture
def libtpu() -> None:
    """For tests that need libtpu (requirements-dev.txt installs it): they fail without it."""
    if importlib.util.find_spec("libtpu") is None:
        missing_tool("libtpu not installed (pip install -r requirements-tpu-plan.txt)")


@pytest.fixture(scope="session")
def play_txt(tmp_path_factory) -> Path:
    """600 KB of generated play text (speeches such as "ROMEO:\\n..."), the session's stand-in for Shakespeare."""
    path = tmp_path_factory.mktemp("corpus") / "play.txt"
    path.write_text(play_text(CORPUS_CHARS), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer_1k(play_txt, tmp_path_factory) -> Path:
    """A LLaMA-style 1000-piece BPE model (byte fallback; unk 0, bos 1, eos 2) trained on `play_txt`."""
    from llama_jax import Tokenizer

    tok = Tokenizer.train(play_txt, 1000, tmp_path_factory.mktemp("tokenizer") / "play_bpe_1000")
    assert tok.vocab_size == 1000
    return tok.path


@pytest.fixture(scope="session")
def tfds_dir(play_txt, tmp_path_factory) -> Path:
    """A TFDS data_dir holding `tiny_shakespeare`, prepared by TFDS's own builder (90/5/5 split) from `play_txt`."""
    import tensorflow_datasets as tfds

    data_dir = tmp_path_factory.mktemp("tensorflow_datasets")
    with pytest.MonkeyPatch.context() as patch:  # the builder's one download is the generated text
        patch.setattr(tfds.download.DownloadManager, "download", lambda self, url: str(play_txt))
        tfds.builder("tiny_shakespeare", data_dir=str(data_dir)).download_and_prepare()
    return data_dir


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that uses a ../shared file `shared` (`-m shared` runs just those)."""
    for item in items:
        if shared_needs(item):
            item.add_marker(pytest.mark.shared)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    """A test whose ../shared file is missing fails before it runs (a failure, never a skip or a setup error)."""
    missing = [str(path) for path in map(shared_path, sorted(shared_needs(item))) if not path.exists()]
    if missing:
        pytest.fail(f"missing {', '.join(missing)} {SHARED_HINT}", pytrace=False)


@pytest.fixture
def tokenizer_32k() -> Path:
    return shared_path("tokenizer_32k")


@pytest.fixture
def shared_tfds_dir() -> Path:
    return shared_path("shared_tfds_dir")


@pytest.fixture
def shakespeare_txt() -> Path:
    return shared_path("shakespeare_txt")
