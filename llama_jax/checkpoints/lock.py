"""One writer per run directory: a lock file naming its owner (host, pid), taken atomically, freed on exit.

Two jobs training into the same `checkpoint.dir` would interleave steps and delete each other's checkpoints, so the
second one stops with one line naming the owner. A lock left by a process that died on this host (SIGKILL, OOM) is
stale and taken over; a lock from another host cannot be checked from here, so the message says how to clear it.
Remote directories (gs://...) have no atomic create-if-absent and are not locked.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from types import TracebackType

from llama_jax.config import ConfigError
from llama_jax.paths import PathLike, as_path, is_remote

LOCK_NAME = ".lock"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a live owner from a reused pid); None if unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(owner: dict) -> bool:
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = _start_time(int(owner["pid"]))
    return started is None or owner.get("started") in (None, started)


class RunLock:
    """Context manager holding `<run_dir>/.lock` (on the process that writes checkpoints, `owner=True`)."""

    def __init__(self, run_dir: PathLike, owner: bool = True):
        self.run_dir = as_path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.held = self.created = False
        self.enabled = owner and not is_remote(self.run_dir)

    def __enter__(self) -> RunLock:
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError(f"checkpoint.dir '{self.run_dir}' is a file; set checkpoint.dir to a directory")
        if not self.enabled:
            return self
        self.created = not self.run_dir.exists()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ConfigError(f"checkpoint.dir '{self.run_dir}' lies under a file; set checkpoint.dir to a "
                              "directory path") from None
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid())}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise ConfigError(f"could not take the lock {self.path}; another job keeps creating it")

    def _take_over_if_stale(self) -> None:
        """Remove the lock if its owner died on this host; otherwise one line naming the owner."""
        try:
            owner = json.loads(self.path.read_text())
        except FileNotFoundError:
            return  # released meanwhile
        except ValueError:
            owner = {}
        if owner.get("host") == socket.gethostname() and owner.get("pid") is not None and not _alive(owner):
            self.path.unlink(missing_ok=True)
            return
        raise ConfigError(f"run directory {self.run_dir} is in use by pid {owner.get('pid', '?')} on host "
                          f"{owner.get('host', '?')}; wait for that job, choose another checkpoint.dir, or delete "
                          f"{self.path} if that job has ended")

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
            if self.created and not any(self.run_dir.iterdir()):
                self.run_dir.rmdir()  # a run that failed before writing anything leaves no trace
