"""Multi-process (multi-host) start-up: join every process of a run into one JAX cluster.

With `train.distributed` set, each process calls `jax.distributed.initialize` before touching any device; afterwards
`jax.devices()` lists every process's devices and the mesh, data shards and checkpoints span all of them. On TPU VMs
(and SLURM / Open MPI clusters) JAX finds the coordinator, process count and index itself. Elsewhere they come from
the config (`train.coordinator_address`, `train.num_processes`, `train.process_id`) or, for any left unset, from the
environment variables `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`.

If a process dies, the others would wait for it in their next collective; instead JAX's coordination service notices
its missing heartbeats within `train.heartbeat_timeout_s` and ends every process with "Terminating process because
the JAX distributed service detected fatal errors ... another task died" (a non-zero exit a scheduler can restart).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax

from llama_jax.config import ConfigError, TrainConfig

ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


def cluster_args(train: TrainConfig, environ: Mapping[str, str] = os.environ) -> dict[str, str | int]:
    """The explicit `jax.distributed.initialize` arguments: config values, else the environment; {} = auto-detect.

    Either all three are known or none is (a half-specified cluster is a mistake that would hang or mis-assign).
    """
    args: dict[str, str | int] = {}
    for name, var in ENV.items():
        value = getattr(train, name)
        if value is None and environ.get(var, "") != "":
            value = environ[var]
        if value is not None:
            try:
                args[name] = str(value) if name == "coordinator_address" else int(value)
            except ValueError:
                raise ConfigError(f"{var} / train.{name} must be an integer, got {value!r}") from None
    if args and len(args) < len(ENV):
        missing = [f"train.{n} (or {ENV[n]})" for n in ENV if n not in args]
        raise ConfigError(f"multi-process setup is incomplete: set {', '.join(missing)} too, or none of them "
                          "on TPU VMs where JAX detects the cluster itself")
    if args and not 0 <= int(args["process_id"]) < int(args["num_processes"]):
        raise ConfigError(f"train.process_id {args['process_id']} must be in 0..{int(args['num_processes']) - 1} "
                          f"(train.num_processes = {args['num_processes']})")
    return args


def initialize(train: TrainConfig) -> None:
    """Join the cluster when `train.distributed` is true (a no-op otherwise, or when already joined).

    Must run before any JAX device use (`jax.devices()`, array creation): JAX fixes its device list on first use.
    """
    if not train.distributed or jax.distributed.is_initialized():
        return
    args = cluster_args(train)
    try:
        jax.distributed.initialize(**args, heartbeat_timeout_seconds=train.heartbeat_timeout_s)
    except (RuntimeError, ValueError) as err:
        how = ("JAX found no cluster to join here; set train.coordinator_address, train.num_processes and "
               "train.process_id (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)" if not args else
               "start every process with the same coordinator address and process count, distinct process ids, "
               "and before any other JAX use")
        raise ConfigError(f"train.distributed=true but jax.distributed.initialize failed "
                          f"({str(err).splitlines()[0]}); {how}") from err
