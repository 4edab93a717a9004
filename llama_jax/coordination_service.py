"""JAX's coordination service in a process of its own, so that killing training process 0 leaves it running.

`jax.distributed.initialize` hosts the service inside process 0. When that process dies, every other process's
coordination client loses its connection at once (measured: within 0.05 s of the SIGKILL) and jaxlib ends it through
a C++ fatal error with a stack trace; jaxlib 0.10-0.11 offer no Python option to turn that error polling off. Run
here instead, the service outlives process 0 and reports it the way it reports any other dead process: its
heartbeat stops, and `PeerWatch` in the survivors prints one line and exits with status 3 first.

Process 0 starts this with `spawn` (in its own session, so a Ctrl-C aimed at process 0 does not end it too) and keeps
a pipe to its stdin. When that pipe closes, process 0 has ended: after a normal exit (announced with a line "done"
first) the service stops at once; otherwise it stays `linger` seconds more, long enough for the survivors'
`PeerWatch` to give its verdict. Its log goes nowhere: holding process 0's stdout/stderr open would make whoever
reads them wait for the lingering service, and what it would report (a task's missed heartbeats) the survivors
already print.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time

READY = "ready"
DONE = "done"


def spawn(port: int, num_processes: int, heartbeat_timeout_s: int, linger_s: float) -> subprocess.Popen:
    """Start the service on `port` (all interfaces) and wait until it listens; raises RuntimeError if it cannot."""
    # Run as a script, not `-m llama_jax.coordination_service`: importing the llama_jax package takes 3.7 s.
    service = subprocess.Popen([sys.executable, __file__, str(port), str(num_processes), str(heartbeat_timeout_s),
                                str(linger_s)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               start_new_session=True)
    line = service.stdout.readline().strip()
    if line != READY:
        service.wait()
        raise RuntimeError(line or f"the coordination service process ended with status {service.returncode}")
    return service


def wait_for_port(port: int, within_s: float) -> None:
    """Wait until nothing listens on `port` (the service of a run that just ended may still be lingering there)."""
    deadline = time.monotonic() + within_s
    while True:
        with socket.socket(socket.AF_INET6) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections in TIME_WAIT do not count
            try:
                sock.bind(("::", port))
                return
            except OSError as err:
                if err.errno != errno.EADDRINUSE:  # e.g. no IPv6 here: the service's own bind will tell
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"port {port} of the coordinator address is in use ({err.strerror}); "
                                       "stop what listens there or choose another port") from None
        time.sleep(0.5)


def serve(port: int, num_processes: int, heartbeat_timeout_s: int, linger_s: float) -> None:
    """The service process: bind, say READY (or the one-line reason it cannot), serve until process 0 has ended."""
    try:
        wait_for_port(port, within_s=linger_s + 5)
        # The module jax.distributed.initialize calls in process 0 (as jax._src.lib._jax); importing jax would
        # add 2 s to start-up.
        import jaxlib._jax as _jax

        service = _jax.get_distributed_runtime_service(f"[::]:{port}", num_processes,
                                                       heartbeat_timeout=heartbeat_timeout_s)
    except Exception as err:
        print(str(err).splitlines()[0], flush=True)
        sys.exit(1)
    print(READY, flush=True)
    if sys.stdin.readline().strip() == DONE:
        sys.stdin.readline()  # returns at end of file: process 0 has passed JAX's shutdown barrier and ended
    else:
        time.sleep(linger_s)
    service.shutdown()
    os._exit(0)


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
