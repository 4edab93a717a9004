"""Training checkpoints with Orbax: save, resume from the newest readable step, reshard, relayout.

A run directory holds one sub-directory per saved step: the parameter format of `orbax_format` (`params/` and
`model/`), plus `opt_state/` (sharded arrays), `meta/` (JSON: step and data-iterator position) and `config/` (the
full run config, for people; restoring never parses it). Restoring targets abstract arrays carrying the *current*
mesh's shardings and dtypes, so a run resumes onto a different mesh or dtype; a different `scan_layers` restacks
parameters and optimizer moments. A stored architecture that differs from the config's is refused before anything
is touched; steps newer than the newest readable one that fail to read for another reason are set aside (renamed
`corrupt-<step>-<time>`) with a loud warning, and the readable one is used. The newest readable step is never moved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from llama_jax.checkpoints.layout import relayout_states
from llama_jax.checkpoints.orbax_format import model_item, read_stored
from llama_jax.config import CheckpointConfig, Config, ConfigError, ExecutionConfig, LlamaConfig
from llama_jax.errors import one_line, warn
from llama_jax.paths import PathLike, absolute

log = logging.getLogger(__name__)

AbstractState = tuple[Any, Any]
"""(params, opt_state) as abstract arrays with shardings: what a step is restored into."""


@dataclass
class Restored:
    step: int
    params: Any
    opt_state: Any
    data_state: Any


def _damage(err: Exception) -> Exception:
    """`err` if it means the step's files are damaged; failures of this machine (memory, permissions, network)
    are re-raised, since setting a good step aside for them would lose progress."""
    machine = (MemoryError, PermissionError, ConnectionError, TimeoutError)
    if isinstance(err, machine) or "RESOURCE_EXHAUSTED" in str(err):
        raise err
    return err


class Checkpointer:
    """Saves every `cfg.every` steps (async, keeping `cfg.max_to_keep`) and restores the newest usable step."""

    def __init__(self, directory: PathLike, cfg: CheckpointConfig):
        self.directory = absolute(directory)
        self.cfg = cfg
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.max_to_keep, create=True,
                                               enable_async_checkpointing=cfg.async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._pending: int | None = None  # the step being written in the background

    def due(self, step: int) -> bool:
        return self.cfg.every > 0 and step % self.cfg.every == 0

    def save(self, step: int, params: Any, opt_state: Any, data_state: Any, config: Config) -> None:
        """Start saving `step` (returns once arrays are copied; writing continues in the background)."""
        if step in self._manager.all_steps():
            return
        with self._writing(self._pending or step):  # a failed background write surfaces at the next save
            self._manager.wait_until_finished()
        self._pending = step
        with self._writing(step):
            self._manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(nnx.to_pure_dict(params)),
                model=ocp.args.JsonSave(model_item(config.model, config.execution)),
                opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave({"step": step, "data": data_state}),
                config=ocp.args.JsonSave(config.to_dict())))

    @contextlib.contextmanager
    def _writing(self, step: int) -> Iterator[None]:
        """A failed write (full disk, quota, permissions) as one OSError line naming the step that is still intact;
        Orbax leaves the partial step in a temporary directory that the next run ignores and cleans up."""
        try:
            yield
        except Exception as err:
            code = re.search(r"os_error_code='(\d+)'", str(err))
            if not isinstance(err, OSError) and code is None:
                raise
            reason = os.strerror(int(code[1])) if code else (err.strerror or one_line(err))
            intact = [s for s in self._manager.all_steps() if s != step]
            kept = f"step {max(intact)} is intact" if intact else "no earlier step exists"
            raise OSError(f"writing checkpoint step {step} to {self.directory} failed ({reason}); {kept}; free space "
                          "or fix the directory, then rerun to resume") from err

    def restore_latest(self, model: LlamaConfig, execution: ExecutionConfig,
                       abstract_state: Callable[[ExecutionConfig], AbstractState]) -> Restored | None:
        """The newest readable checkpoint restored as `execution` lays it out, or None if there is none.

        `abstract_state(execution)` gives the restore target for a layout. Steps are tried newest first; nothing is
        renamed until one restores, so a step whose architecture differs from `model` (ConfigError), a failure that
        is not the step's fault (memory, permissions, network: re-raised), or no readable step at all (ValueError)
        leaves the directory as it was. Only the unreadable steps newer than the restored one are set aside.
        """
        unreadable: list[tuple[int, Exception]] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                stored = read_stored(self.directory / str(step))
            except Exception as err:  # noqa: BLE001 - a missing or damaged description means this step is unusable
                unreadable.append((step, _damage(err)))
                continue
            differences = stored.cfg.shape_differences(model)
            if differences:
                raise ConfigError(f"checkpoint step {step} in {self.directory} was written for another model "
                                  f"(stored vs config: {'; '.join(differences)}); use another checkpoint.dir or the "
                                  "original model settings")
            try:
                restored = self._restore(step, stored.variable_leaves, model.n_layers, execution, stored.scan_layers,
                                         abstract_state)
            except Exception as err:  # noqa: BLE001 - any read failure of the step's own files makes it unusable
                unreadable.append((step, _damage(err)))
                continue
            for bad, err in unreadable:
                warn(log, f"checkpoint step {bad} in {self.directory} is unreadable ({type(err).__name__}: "
                      f"{one_line(err)}); set aside as corrupt-{bad}-*, resuming from step {step}")
                self._set_aside(bad)
            return restored
        if unreadable:
            step, err = unreadable[0]
            raise ValueError(f"no readable checkpoint in {self.directory}: step {step} failed with "
                             f"{type(err).__name__}: {one_line(err)}; nothing was changed there") from err
        return None

    def _restore(self, step: int, variable_leaves: bool, n_layers: int, execution: ExecutionConfig,
                 stored_scan: bool, abstract_state: Callable[[ExecutionConfig], AbstractState]) -> Restored:
        """Read `step` in its stored layout (dtypes and shardings from the target), then relayout if needed."""
        params_target, opt_target = abstract_state(dataclasses.replace(execution, scan_layers=stored_scan))
        # Steps saved before the `model/` item held nnx Variables ({"value": array}); newer ones plain arrays.
        restored = self._manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(params_target if variable_leaves else nnx.to_pure_dict(params_target)),
            opt_state=ocp.args.StandardRestore(opt_target),
            meta=ocp.args.JsonRestore()))
        params = jax.tree.map(lambda a: a, params_target)
        nnx.replace_by_pure_dict(params, nnx.to_pure_dict(restored["params"]) if variable_leaves else restored["params"])
        opt_state = restored["opt_state"]
        if stored_scan != execution.scan_layers:
            params, opt_state = relayout_states((params, opt_state), abstract_state(execution), n_layers,
                                                execution.scan_layers)
        meta = restored["meta"]
        return Restored(meta["step"], params, opt_state, meta["data"])

    def _set_aside(self, step: int) -> None:
        """Move an unreadable step out of the way so later saves of that step number do not collide with it."""
        self._manager.reload()
        if jax.process_index() == 0:
            path = self.directory / str(step)
            path.rename(self.directory / f"corrupt-{step}-{int(time.time())}")
        self._manager.reload()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def close(self) -> None:
        """Wait for an async save to finish and release Orbax's threads (safe to call twice)."""
        if self._manager is None:
            return
        try:
            with self._writing(self._pending or 0):
                self._manager.wait_until_finished()
        finally:
            self._manager.close()
            self._manager = None

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
