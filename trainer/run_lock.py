"""One driver per run directory: `<run>/driver.lock` names the host and pid of the driver holding it.

    lock = RunLock.acquire(run_dir)     # RunLockedError if a live driver holds it
    ...
    lock.release()

Two drivers on one run directory would append to one ledger and one metrics file and delete each
other's in-flight checkpoints; the second one must refuse before it writes anything. The lock file is
JSON `{"host", "pid", "started"}`. A lock whose holder is a dead process on this host is stale (the
driver was killed) and is taken over; a lock held from another host cannot be checked from here, so
it refuses and says which file to delete once that driver is known to be gone.

Checking and replacing the file happen under an exclusive `flock` on the run directory itself, so two
drivers starting at once on one host cannot both see "free" (or both take over one stale lock). The
kernel drops that flock when its holder dies: the guard itself can never go stale.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from models.errors import UserError
from trainer.durable import write_atomic

log = logging.getLogger(__name__)

LOCK_FILE = "driver.lock"


class RunLockedError(UserError, RuntimeError):
    """Another driver holds the run directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _read_holder(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable or torn: a holder we cannot identify
    return holder if isinstance(holder, dict) else {}


class RunLock:
    def __init__(self, path: Path, holder: dict):
        self.path = path
        self.holder = holder

    @classmethod
    def acquire(cls, run_dir: Path) -> "RunLock":
        """Hold `run_dir` (created if missing) for this process, or raise RunLockedError naming the holder."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_FILE
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": round(time.time(), 3)}
        guard = os.open(run_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)
            holder = _read_holder(path)
            if holder is not None:
                cls._refuse_unless_stale(path, holder, me)
            write_atomic(path, json.dumps(me) + "\n")
        finally:
            os.close(guard)  # releases the flock
        return cls(path, me)

    @staticmethod
    def _refuse_unless_stale(path: Path, holder: dict, me: dict) -> None:
        host, pid = holder.get("host"), holder.get("pid")
        if not isinstance(pid, int) or not host:
            raise RunLockedError(f"{path} exists but names no host and pid ({path.read_text(errors='replace')[:200]!r}); "
                                 f"if no driver is running on {path.parent}, delete {path} and start again")
        if host == me["host"] and pid == me["pid"]:
            return  # this process already holds it (a second acquire in one driver)
        if host == me["host"] and not _alive(pid):
            log.warning("%s: taking over the lock of driver pid %d on %s, which is no longer running",
                        path, pid, host)
            return
        where = "this host" if host == me["host"] else f"host {host}"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"])) if "started" in holder else "?"
        raise RunLockedError(
            f"run directory {path.parent} is in use by another cairl train driver (host {host}, pid {pid}, since "
            f"{since}); one run directory takes one driver at a time. Wait for it to finish or stop it, or choose "
            f"another run.name" + ("" if host == me["host"] else
                                   f". It runs on {where}: if that driver is gone, delete {path}"))

    def release(self) -> None:
        """Remove the lock file if it is still ours."""
        holder = _read_holder(self.path)
        if holder and holder.get("host") == self.holder["host"] and holder.get("pid") == self.holder["pid"]:
            self.path.unlink(missing_ok=True)
