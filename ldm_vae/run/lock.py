"""One run per run folder: a lock file naming the process that writes it.

Two submissions of one job, or two people, starting into the same folder would interleave
checkpoints and logs. The main process of a run holds `OUTPUT_DIR/.lock` (host, pid, the
pid's start time, since when) from before it reads or writes the folder until it ends. A
lock whose process is gone (killed, preempted: the lock stays behind) is detected on its
own host and taken over; a lock from another host cannot be checked from here and is
refused with the file to delete.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from accelerate.logging import get_logger

from ..errors import UserError

LOCK_FILE = ".lock"
logger = get_logger(__name__)


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _running(holder: dict) -> bool:
    """Is the process that wrote `holder` (on this host) still running?"""
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: running
        pass
    start = _start_time(holder["pid"])
    return start is None or holder.get("start") is None or start == holder["start"]


class RunLock:
    """`with RunLock(folder, main)`: hold the folder's lock on the main process (others pass)."""

    def __init__(self, folder: Path, main: bool):
        self.folder, self.main, self.path, self.created = Path(folder), main, Path(folder) / LOCK_FILE, False

    def __enter__(self) -> RunLock:
        if not self.main:
            return self
        self.created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid()),
              "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                self._check_holder(me)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return self

    def _check_holder(self, me: dict) -> None:
        """Remove a stale lock, or refuse a live one."""
        try:
            holder = json.loads(self.path.read_text())
            host, pid, since = holder["host"], int(holder["pid"]), holder.get("since", "?")
        except FileNotFoundError:  # released meanwhile
            return
        except (OSError, ValueError, KeyError, TypeError):  # half-written by a process killed while writing it
            self.path.unlink(missing_ok=True)
            return
        if host != me["host"]:
            raise UserError(f"{self.folder} is locked by a run on host {host} (pid {pid}, since {since}); another run "
                            f"may be writing it. If that run has ended, delete {self.path}; or choose another "
                            f"--output-dir (nothing was changed)")
        if pid != me["pid"] and _running({**holder, "pid": pid}):
            raise UserError(f"{self.folder} is being written by a running ldm-vae run (host {host}, pid {pid}, since "
                            f"{since}); wait for it to end, stop it, or choose another --output-dir (nothing was "
                            f"changed)")
        logger.warning(f"{self.path}: the run that held it (pid {pid}) is not running any more; taking it over",
                       main_process_only=True)
        self.path.unlink(missing_ok=True)

    def __exit__(self, *exc) -> None:
        if not self.main:
            return
        self.path.unlink(missing_ok=True)
        if self.created and not any(self.folder.iterdir()):  # a run refused before it wrote anything
            self.folder.rmdir()
