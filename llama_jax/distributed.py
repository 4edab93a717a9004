"""Multi-process (multi-host) start-up: join every process of a run into one JAX cluster.

With `train.distributed` set, each process calls `jax.distributed.initialize` before touching any device; afterwards
`jax.devices()` lists every process's devices and the mesh, data shards and checkpoints span all of them. On TPU VMs
(and SLURM / Open MPI clusters) JAX finds the coordinator, process count and index itself. Elsewhere they come from
the config (`train.coordinator_address`, `train.num_processes`, `train.process_id`) or, for any left unset, from the
environment variables `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`.

If a process dies, the others would wait for it in their next collective, and JAX's coordination service, noticing
its missing heartbeats after `train.heartbeat_timeout_s`, would end them with a C++ fatal error and stack trace (the
`missed_heartbeat_callback` that could replace it cannot be used from Python in jaxlib 0.10: calling it aborts with
std::bad_cast). So `PeerWatch` keeps a heartbeat of its own in the service's key-value store, checked in half that
time: a survivor prints one line naming the silent process and how to resume, and exits with status 3 before JAX's
fatal path (and before the run dir's lock or an interrupted save could matter: checkpoints commit atomically). A
collective that fails because a peer's connection dropped (CPU collectives raise at once) waits for that verdict.
Process 0 of an explicitly configured cluster runs the coordination service as a process of its own
(`coordination_service`), so that process 0's own death is reported the same way instead of aborting the others.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from collections.abc import Mapping

import jax

from llama_jax import coordination_service
from llama_jax.config import ConfigError, TrainConfig

PEER_LOST_STATUS = 3
ALIVE_KEY = "llama_jax/alive"
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
        jax.distributed.initialize(**args, **own_service_args(args, train.heartbeat_timeout_s),
                                   heartbeat_timeout_seconds=train.heartbeat_timeout_s)
    except (RuntimeError, ValueError) as err:
        how = ("JAX found no cluster to join here; set train.coordinator_address, train.num_processes and "
               "train.process_id (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)" if not args else
               "start every process with the same coordinator address and process count, distinct process ids, "
               "and before any other JAX use")
        raise ConfigError(f"train.distributed=true but jax.distributed.initialize failed "
                          f"({str(err).splitlines()[0]}); {how}") from err
    if jax.process_count() > 1:
        PeerWatch.start_for(train.heartbeat_timeout_s / 2)


def own_service_args(args: Mapping[str, str | int], heartbeat_timeout_s: int) -> dict[str, str]:
    """In process 0 of an explicitly configured cluster, start the coordination service as a process of its own
    (`coordination_service`) on the coordinator address and move the one `jax.distributed.initialize` starts to a
    spare port nobody connects to; {} elsewhere (auto-detected clusters keep JAX's service inside process 0)."""
    if not args or args["process_id"] != 0 or int(args["num_processes"]) < 2:
        return {}
    port = int(str(args["coordinator_address"]).rsplit(":", 1)[1])
    service = coordination_service.spawn(port, int(args["num_processes"]), heartbeat_timeout_s,
                                         linger_s=heartbeat_timeout_s / 2 + 5)
    atexit.register(lambda: (service.stdin.write(coordination_service.DONE + "\n"), service.stdin.flush()))
    return {"coordinator_bind_address": "127.0.0.1:0"}


class PeerWatch(threading.Thread):
    """Every `interval` s: bump this process's counter under ALIVE_KEY and read the others'; a peer whose counter has
    not moved for `limit` s, or an unreachable coordinator, ends this process with one line (`exit_lost_peer`).

    At interpreter exit the counter becomes "done", so a peer that finished first (and stops beating while it waits
    in JAX's shutdown barrier) is not mistaken for a dead one.
    """

    current: PeerWatch | None = None

    def __init__(self, limit: float, interval: float):
        super().__init__(name="llama_jax-peer-watch", daemon=True)
        from jax._src import distributed as jax_distributed  # the client jax.distributed.initialize connected

        self.client = jax_distributed.global_state.client
        self.index, self.count = jax.process_index(), jax.process_count()
        self.limit, self.interval = limit, interval
        self.stopping = threading.Event()

    @classmethod
    def start_for(cls, limit: float) -> PeerWatch:
        cls.current = cls(limit, min(1.0, limit / 4))
        cls.current.start()
        atexit.register(cls.current.finish)
        return cls.current

    def finish(self) -> None:
        self.stopping.set()
        try:
            self.client.key_value_set(f"{ALIVE_KEY}/{self.index}", "done", allow_overwrite=True)
        except Exception:  # the coordinator may be gone already; peers then learn it from JAX's shutdown
            pass

    def run(self) -> None:
        seen: dict[int, tuple[str | None, float]] = {p: (None, time.monotonic()) for p in range(self.count)}
        beat = 0
        while not self.stopping.wait(self.interval):
            beat += 1
            try:
                self.client.key_value_set(f"{ALIVE_KEY}/{self.index}", str(beat), allow_overwrite=True)
                values = {p: self._read(p) for p in seen if p != self.index}
            except Exception as err:
                if not self.stopping.is_set():
                    exit_lost_peer(f"the coordinator (process 0) of this {self.count}-process run is unreachable "
                                   f"({str(err).splitlines()[0][:120]})", self.index)
                return
            now = time.monotonic()
            for p, value in values.items():
                if value == "done":
                    continue
                if value != seen[p][0]:
                    seen[p] = (value, now)
                elif now - seen[p][1] > self.limit and not self.stopping.is_set():
                    exit_lost_peer(f"process {p} of this {self.count}-process run stopped responding "
                                   f"{now - seen[p][1]:.0f} s ago (killed, crashed or its host is unreachable; "
                                   "see its log)", self.index)

    def _read(self, process: int) -> str | None:
        try:
            return self.client.key_value_try_get(f"{ALIVE_KEY}/{process}")
        except Exception as err:
            if "NOT_FOUND" in str(err):  # that peer's first beat has not arrived yet
                return None
            raise


def exit_lost_peer(what: str, index: int) -> None:
    """End this process at once with one line: a normal exit would block in JAX's shutdown barrier and then abort."""
    print(f"\nerror: {what}; process {index} stops too. Start every process again with the same command: training "
          "resumes from the last checkpoint", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(PEER_LOST_STATUS)


def await_peer_verdict(err: BaseException) -> None:
    """After `err` in a multi-process run: if a peer has died (a collective fails at once when its connection drops),
    give `PeerWatch` the time to notice and end the process with its line; returns if no peer is missing."""
    watch = PeerWatch.current
    if watch is not None and watch.is_alive() and type(err).__name__ == "JaxRuntimeError":
        watch.join(watch.limit + 2 * watch.interval + 1)
