"""Which failures are the user's input or environment (one line, exit 2) and which are bugs (a traceback).

Library calls that read user input convert their errors at the source into ValueError / OSError messages that name
the input and the fix. `expected_failure` is the safety net behind them: it classifies what still escapes (our
errors, OS errors such as a full disk, and the few library error types that always mean bad input) and squeezes the
message onto one line; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

DEBUG_ENV = "LLAMA_JAX_DEBUG"
MAX_CHARS = 400


def debug_enabled() -> bool:
    """True when LLAMA_JAX_DEBUG is set to something other than empty/0: expected failures keep their traceback."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _library_input_errors() -> tuple[type[BaseException], ...]:
    """Library exception types that only ever report bad input files (imported lazily: the CLI starts fast)."""
    import yaml
    from safetensors import SafetensorError
    return yaml.YAMLError, SafetensorError


def one_line(err: BaseException) -> str:
    """The first non-empty line of `err`'s message (type name if none), at most MAX_CHARS characters."""
    line = next((s.strip() for s in str(err).splitlines() if s.strip()), type(err).__name__)
    return line if len(line) <= MAX_CHARS else line[:MAX_CHARS - 3] + "..."


def expected_failure(err: BaseException) -> str | None:
    """One line for an expected failure (bad input, missing/unwritable files, full disk, out of memory), else None."""
    if isinstance(err, (ValueError, OSError, TrainingHalted)):
        return one_line(err)
    if isinstance(err, _library_input_errors()):
        return f"{type(err).__name__}: {one_line(err)}"
    if type(err).__name__ == "JaxRuntimeError" and "RESOURCE_EXHAUSTED" in str(err):
        return (f"out of device memory ({one_line(err)}); lower train.batch_size or data.seq_len, set "
                "execution.remat=full, or use more devices")
    return None


class TrainingHalted(RuntimeError):
    """Training stopped on purpose (e.g. NaN/Inf under `train.nonfinite`); the message says where and why."""


def warn(log: logging.Logger, message: str) -> None:
    """A warning that must not be missed: logged, and printed on stderr even where logging is not configured."""
    log.warning(message)
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def reading(path: object, errors: tuple[type[BaseException], ...] = (ValueError,),
            fix: str = "re-download or re-create it") -> Iterator[None]:
    """Turn a library's error while parsing the file or directory `path` into one line naming it and the fix."""
    try:
        yield
    except errors as err:
        raise ValueError(f"{path} could not be read ({one_line(err)}); it is damaged or incomplete: {fix}") from err
