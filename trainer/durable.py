"""Small run-state files replaced so that a crash or power loss leaves the old or the new content, never none.

    write_atomic(run_dir / "stages.json", text)

`os.replace` alone is atomic only for the directory entry: after a host crash the new name can point at
a file whose data never reached the disk (an empty stages.json). So the temporary file is fsynced before
the rename, and the directory after it, so that the rename itself is durable.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from models.errors import UserError

_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class DiskFullError(UserError, OSError):
    """The disk (or a quota or file-size limit) refused a write of run state."""


def raise_if_disk_full(err: BaseException, what: str) -> None:
    """Re-raise `err` as a DiskFullError naming `what` when it (or its cause) is ENOSPC, EFBIG or EDQUOT."""
    seen = err
    while seen is not None:
        # Orbax and TensorStore report the errno only in their message.
        if (isinstance(seen, OSError) and seen.errno in _FULL) or any(os.strerror(e) in str(seen) for e in _FULL):
            reason = next((os.strerror(e) for e in _FULL if os.strerror(e) in str(seen)), "disk full")
            raise DiskFullError(
                f"no space left writing {what} ({reason}); earlier state is intact — free disk "
                f"space (or raise the quota) and resume the run with `cairl train --resume RUN_DIR`") from None
        seen = seen.__cause__ or seen.__context__


def fsync_directory(directory: Path) -> None:
    """Make the entries of `directory` (a rename, a new file) durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8) durably: write a sibling, fsync it, rename, fsync the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except OSError as err:
        raise_if_disk_full(err, str(path))
        raise
    finally:
        tmp.unlink(missing_ok=True)


def append_line(path: Path, line: str) -> None:
    """Append one complete line durably (flush + fsync), so a record is on disk when this returns.

    A write the disk refuses midway is cut back off, so the file still ends with a complete line.
    """
    data = memoryview(line.encode("utf-8"))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        except OSError as err:
            os.ftruncate(fd, start)
            raise_if_disk_full(err, str(path))
            raise
    finally:
        os.close(fd)


def cut_torn_tail(path: Path) -> bool:
    """Drop a partial last line left by a crash mid-write, so appends start on a fresh line; True if cut."""
    path = Path(path)
    if not path.exists():
        return False
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return False
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return False
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    with path.open("r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return True
