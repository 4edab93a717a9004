"""Lets a plain `lm_eval --model llama_jax` find our model on lm-eval releases without model plugin discovery.

lm-eval reads the `lm_eval.models` entry point group (declared in our pyproject.toml) only from its plugin
mechanism onwards (EleutherAI/lm-evaluation-harness#4013, merged after the 0.4.13 release); 0.4.13 resolves
`--model` from its own table alone. `llama_jax_lm_eval.pth`, installed beside this module, imports it at interpreter
start. It imports nothing heavy: it waits for lm_eval to import `lm_eval.models` (its table of built-in models) and
then registers every installed `lm_eval.models` entry point as a lazy "module:Class" placeholder, as #4013 does. A
lm-eval that discovers plugins itself (its registry has `load_plugins`) is left alone.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import sys
from types import ModuleType

GROUP = "lm_eval.models"
WATCHED = "lm_eval.models"


def register_entry_points() -> None:
    """Add each `lm_eval.models` entry point that lm_eval does not know yet to its model registry."""
    from lm_eval.api import registry

    if hasattr(registry, "load_plugins"):
        return
    for entry in importlib.metadata.entry_points(group=GROUP):
        if entry.name not in registry.model_registry:
            registry.model_registry.register(entry.name, target=entry.value)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds `lm_eval.models` through the other finders and registers the entry points once it has executed."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if name != WATCHED:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            execute = spec.loader.exec_module

            def exec_module(module: ModuleType) -> None:
                execute(module)
                register_entry_points()

            spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Called from the .pth file: watch for lm_eval's model table (or register now if it is already imported)."""
    if WATCHED in sys.modules:
        register_entry_points()
    elif not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
