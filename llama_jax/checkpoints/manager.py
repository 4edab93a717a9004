"""Training checkpoints with Orbax: save, resume from the newest readable step, reshard, and read back params.

A run directory holds one sub-directory per saved step with four items: `params` and `opt_state` (sharded arrays),
`meta` (JSON: step and data-iterator position) and `config` (the full run config as JSON). Restoring targets
abstract arrays carrying the *current* mesh's shardings, so a run resumes onto a different mesh. An unreadable
newest step is set aside (renamed `corrupt-<step>`) with a loud warning and the previous one is used instead.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from llama_jax.checkpoints.layout import TensorGetter, iter_meta_tensors, restore_target
from llama_jax.config import CheckpointConfig, Config, LlamaConfig, from_dict
from llama_jax.model import Llama
from llama_jax.paths import AnyPath, PathLike, absolute, as_path

log = logging.getLogger(__name__)


@dataclass
class Restored:
    step: int
    params: Any
    opt_state: Any
    data_state: Any


def _warn(message: str) -> None:
    log.warning(message)
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


class Checkpointer:
    """Saves every `cfg.every` steps (async, keeping `cfg.max_to_keep`) and restores the newest usable step."""

    def __init__(self, directory: PathLike, cfg: CheckpointConfig):
        self.directory = absolute(directory)
        self.cfg = cfg
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.max_to_keep, create=True,
                                               enable_async_checkpointing=cfg.async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def due(self, step: int) -> bool:
        return self.cfg.every > 0 and step % self.cfg.every == 0

    def save(self, step: int, params: Any, opt_state: Any, data_state: Any, config: Config) -> None:
        """Start saving `step` (returns once arrays are copied; writing continues in the background)."""
        if step in self._manager.all_steps():
            return
        self._manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave({"step": step, "data": data_state}),
            config=ocp.args.JsonSave(config.to_dict())))

    def restore_latest(self, params: Any, opt_state: Any) -> Restored | None:
        """The newest readable checkpoint restored onto the abstract targets' shardings, or None if there is none.

        A step that fails to read is renamed aside with a warning and the next older one is tried; if every step
        fails, the last error is raised rather than silently starting again from step 0.
        """
        steps = sorted(self._manager.all_steps(), reverse=True)
        for i, step in enumerate(steps):
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(params),
                    opt_state=ocp.args.StandardRestore(opt_state),
                    meta=ocp.args.JsonRestore()))
            except Exception as err:  # noqa: BLE001 - any read failure means this step is unusable
                if i == len(steps) - 1:
                    raise ValueError(f"no readable checkpoint in {self.directory}: step {step} failed with "
                                       f"{type(err).__name__}: {err}") from err
                _warn(f"checkpoint step {step} in {self.directory} is unreadable ({type(err).__name__}: "
                      f"{str(err).splitlines()[0] if str(err) else ''}); falling back to step {steps[i + 1]}")
                self._set_aside(step)
                continue
            meta = restored["meta"]
            return Restored(meta["step"], restored["params"], restored["opt_state"], meta["data"])
        return None

    def _set_aside(self, step: int) -> None:
        """Move an unreadable step out of the way so later saves of that step number do not collide with it."""
        self._manager.reload()
        if jax.process_index() == 0:
            path = self.directory / str(step)
            path.rename(self.directory / f"corrupt-{step}-{int(time.time())}")
        self._manager.reload()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _step_dir(path: AnyPath) -> AnyPath:
    """`path` itself if it is one saved step, else the newest step directory inside a run directory."""
    if (path / "params").is_dir():
        return path
    steps = sorted((int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / "params").is_dir()),
                   reverse=True) if path.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"'{path}' holds no llama_jax training checkpoint (expected <step>/params inside)")
    return path / str(steps[0])


def is_checkpoint(path: PathLike) -> bool:
    """True for a run directory or a step directory written by `Checkpointer`."""
    try:
        step = _step_dir(as_path(path))
    except FileNotFoundError:
        return False
    return (step / "config").is_dir()


def read_config(path: PathLike) -> Config:
    """The run config stored with a checkpoint (run directory or step directory)."""
    raw = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(absolute(_step_dir(as_path(path))) / "config")
    return from_dict(Config, raw)


def _restore_params(step: AnyPath, model_cfg: LlamaConfig, mesh: Mesh | None) -> tuple[nnx.GraphDef, nnx.State]:
    graphdef, abstract = restore_target(model_cfg, mesh)
    with ocp.StandardCheckpointer() as checkpointer:
        return graphdef, checkpointer.restore(absolute(step) / "params", abstract)


def load_params(path: PathLike, mesh: Mesh | None = None) -> tuple[LlamaConfig, nnx.State]:
    """Model config and parameters of a training checkpoint, sharded onto `mesh` (default: the first device)."""
    step = _step_dir(as_path(path))
    model_cfg = read_config(step).model
    return model_cfg, _restore_params(step, model_cfg, mesh)[1]


def restore_checkpoint(path: PathLike, cfg: LlamaConfig, mesh: Mesh | None) -> Llama | None:
    """`load_pretrained` fast path: restore straight onto `mesh`, or None if `cfg` stores params differently."""
    step = _step_dir(as_path(path))
    stored = read_config(step).model
    if (cfg.scan_layers, cfg.param_dtype) != (stored.scan_layers, stored.param_dtype):
        return None
    return nnx.merge(*_restore_params(step, cfg, mesh))


def read_checkpoint(path: PathLike) -> tuple[LlamaConfig, TensorGetter]:
    """`load_pretrained` reader: the model config and a Meta-named tensor getter (params read on first use)."""
    step = _step_dir(as_path(path))
    model_cfg = read_config(step).model

    @functools.cache
    def tensors() -> dict[str, Any]:
        return dict(iter_meta_tensors(nnx.merge(*_restore_params(step, model_cfg, None))))

    return model_cfg, lambda name: tensors()[name]


def write_checkpoint(*_: Any, **__: Any) -> None:
    raise ValueError("llama_jax training checkpoints are written by `python -m llama_jax train`; "
                     "export a model with format='hf' (or 'orbax', 'meta', 'llama2c') instead")
