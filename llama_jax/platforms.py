"""Which JAX platforms this machine can use, decided once before any backend starts (imported by `llama_jax`).

With libtpu installed (the test extras, or a shared jax[tpu] image), JAX's platform search loads it on every
machine, and where no TPU chip exists it prints a dozen lines of warnings on every command. So when JAX_PLATFORMS
is unset, libtpu is installed and no TPU chip sits on the PCI bus, JAX is told the platforms that can work here:
the GPU plugin's when a GPU is visible and its plugin is installed, and the CPU. An explicit JAX_PLATFORMS, or
JAX_FORCE_TPU_INIT, always wins.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping

GPU_PLUGINS = {"cuda": ("jax_cuda13_plugin", "jax_cuda12_plugin"), "rocm": ("jax_rocm7_plugin", "jax_rocm60_plugin")}
GPU_DEVICE_FILES = {"cuda": "/dev/nvidiactl", "rocm": "/dev/kfd"}


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _tpu_chips() -> int:
    from jax._src import hardware_utils  # what JAX itself consults before loading libtpu
    return hardware_utils.num_available_tpu_chips_and_device_id()[0]


def platforms(environ: Mapping[str, str] = os.environ) -> str | None:
    """The JAX_PLATFORMS value to use on this machine, or None to leave JAX's own choice."""
    if environ.get("JAX_PLATFORMS") or "JAX_FORCE_TPU_INIT" in environ or not _installed("libtpu"):
        return None
    if _tpu_chips():
        return None
    gpus = [name for name, modules in GPU_PLUGINS.items()
            if os.path.exists(GPU_DEVICE_FILES[name]) and any(_installed(m) for m in modules)]
    return ",".join([*gpus, "cpu"])


def choose_platforms() -> None:
    """Apply `platforms()` to JAX's config (a no-op once a backend has started: it keeps what it has)."""
    chosen = platforms()
    if chosen is not None:
        import jax
        jax.config.update("jax_platforms", chosen)
