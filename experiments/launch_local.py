"""Run a multi-process training on this machine: N CPU processes with K simulated devices each, one JAX cluster.

    python experiments/launch_local.py --processes 2 --devices 4 --config experiments/configs/tiny_ci.yaml \
        checkpoint.dir=runs/mp data.data_dir=../shared/tensorflow_datasets

Each process runs `python -m llama_jax train --config FILE train.distributed=true [key=value ...]` with its own
`JAX_PROCESS_ID`, a shared `JAX_COORDINATOR_ADDRESS` (a free localhost port) and `JAX_NUM_PROCESSES`, exactly as on
a multi-host cluster; every output line is prefixed with `[pI]`. If one process fails the others are stopped (they
would otherwise wait on it in a collective); SIGTERM/SIGINT to the launcher is passed on to every process, which
saves one checkpoint and exits. The exit status is the first non-zero one of the processes, else 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import IO


def free_port() -> int:
    """A TCP port on localhost nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_env(base: dict[str, str], devices: int, address: str, processes: int, index: int) -> dict[str, str]:
    """`base` with the process's cluster variables, CPU platform and `devices` simulated host devices (the
    environment form of `llama_jax.sharding.simulate_cpu_devices`, which takes precedence over XLA_FLAGS)."""
    return {**base, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices), "JAX_COORDINATOR_ADDRESS": address,
            "JAX_NUM_PROCESSES": str(processes), "JAX_PROCESS_ID": str(index)}


def _forward(stream: IO[str], prefix: str) -> None:
    for line in stream:
        sys.stdout.write(f"{prefix} {line}")
        sys.stdout.flush()


def launch(config: str, overrides: Sequence[str], processes: int, devices: int, command: str = "train") -> int:
    """Start the processes, forward their output, wait for all; returns the first non-zero exit status (or 0)."""
    if processes < 1 or devices < 1:
        raise SystemExit(f"error: --processes ({processes}) and --devices ({devices}) must be at least 1")
    address = f"127.0.0.1:{free_port()}"
    argv = [sys.executable, "-m", "llama_jax", command, "--config", config, "train.distributed=true", *overrides]
    procs = [subprocess.Popen(argv, env=process_env(dict(os.environ), devices, address, processes, i),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
             for i in range(processes)]
    for i, p in enumerate(procs):
        print(f"[launch] process {i}: pid {p.pid}, coordinator {address}", flush=True)
    threads = [threading.Thread(target=_forward, args=(p.stdout, f"[p{i}]"), daemon=True) for i, p in enumerate(procs)]
    for thread in threads:
        thread.start()

    def pass_on(signum: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, pass_on)
    signal.signal(signal.SIGINT, pass_on)
    status = 0
    remaining = set(range(processes))
    while remaining:
        for i in sorted(remaining):
            try:
                rc = procs[i].wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            remaining.discard(i)
            if rc and not status:
                status = rc
                print(f"[launch] process {i} exited with status {rc}; stopping the others", flush=True)
                for j in remaining:
                    procs[j].kill()
    for thread in threads:
        thread.join()
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", "-n", type=int, default=2, help="number of processes (simulated hosts)")
    parser.add_argument("--devices", "-d", type=int, default=4, help="simulated CPU devices per process")
    parser.add_argument("--command", default="train", choices=["train", "finetune"], help="what every process runs")
    parser.add_argument("--config", required=True, help="training YAML config")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides passed to every process")
    args = parser.parse_args(argv)
    return launch(args.config, args.overrides, args.processes, args.devices, args.command)


if __name__ == "__main__":
    sys.exit(main())
