"""What an OSError met creating or writing an output means to an operator: a full disk (DiskFullError) or a place
this process cannot write (CheckpointError naming it), each with what to do; anything else is raised as it is."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import NoReturn

from engine.core.errors import CheckpointError, DiskFullError


def disk_full(e: OSError, path: Path) -> Exception:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"no space left on device writing {path}", at=str(path),
                             hint="free space on that filesystem (or pick another --dst), then run the same "
                                  "command again: finished shards are kept")
    return e


_NOT_WRITABLE = {errno.EROFS: "its filesystem is read-only", errno.EACCES: "permission denied",
                 errno.EPERM: "operation not permitted"}


def write_error(e: OSError, path: Path, doing: str = "create") -> Exception:
    """Our error for an OSError met creating or writing `path` (or the file the error names): a place this
    process cannot write, a full disk (disk_full), else `e` itself."""
    why = _NOT_WRITABLE.get(e.errno)
    if why is None:
        return disk_full(e, path)
    where = Path(e.filename) if isinstance(e.filename, (str, os.PathLike)) else path
    return CheckpointError(f"cannot {doing} {where}: {why}", at=str(where),
                           hint="choose an output (--dst) on a writable filesystem, or make that directory writable "
                                "for this user; then run the same command again")


def raise_write_error(e: OSError, path: Path, doing: str = "create") -> NoReturn:
    err = write_error(e, path, doing)
    if err is e:
        raise e
    raise err from e


def make_output_dir(path: str | os.PathLike) -> Path:
    """`mkdir -p path` for an output; a place this process cannot write raises CheckpointError naming it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise_write_error(e, path)
    return path
