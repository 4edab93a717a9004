"""Optional dependencies (the server, lm-evaluation-harness): a one-line install hint instead of an ImportError."""

from __future__ import annotations

import importlib.util


def require(*modules: str, extra: str) -> None:
    """Raise ValueError naming the requirements file to install when any of `modules` is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} not installed; run: pip install -r requirements-{extra}.txt")
