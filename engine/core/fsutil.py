"""Small filesystem pieces shared by every stage: atomic writes, hashing, free space."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from engine.core.errors import DiskFullError
from engine.core.libc import libc

HASH_CHUNK = 8 << 20


def fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_replace(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a sibling temp path to write; on success rename it over `path` and fsync the directory, on any
    error remove it: readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a sibling temp file and a rename: readers see old or new, never half."""
    try:
        with atomic_replace(path) as tmp, open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        if e.errno == 28:  # ENOSPC
            raise DiskFullError(f"no space left writing {path}", at=str(path),
                                hint="free space on that filesystem, then resume") from e
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        return default


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the filesystem holding `path` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def user_cache_dir(*parts: str) -> Path:
    """`<user cache dir>/quantdeck/<parts>`: platformdirs' answer where it is installed, else $XDG_CACHE_HOME or
    ~/.cache (a machine with only numpy and torch running `python -m engine.convert`)."""
    try:
        import platformdirs
    except ImportError:
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "quantdeck", *parts)
    return Path(platformdirs.user_cache_dir("quantdeck"), *parts)


def boot_id() -> str:
    """This machine's boot: another value after a reboot (QUANTDECK_BOOT_ID wins; "" where the kernel has none)."""
    from engine.core.settings import settings

    own = settings().boot_id
    if own:
        return own
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def sync_filesystems(paths: list[str | os.PathLike]) -> int:
    """Write to the disk whatever the page cache holds for the filesystems of `paths` (those that exist):
    syncfs(2) once per filesystem where libc has it, else sync(2). Returns the filesystems synced. Raises OSError
    when syncfs fails (a write-back error included): what it was to sync may not be on the disk."""
    seen: dict[int, Path] = {}
    for p in paths:
        p = Path(p)
        while not p.exists() and p != p.parent:
            p = p.parent
        try:
            seen.setdefault(p.stat().st_dev, p)
        except OSError:
            continue
    import ctypes

    syncfs = _libc_syncfs()
    if syncfs is None:
        os.sync()
        return len(seen)
    for p in seen.values():
        fd = os.open(p, os.O_RDONLY)
        try:
            if syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"syncfs: {os.strerror(err)}", str(p))
        finally:
            os.close(fd)
    return len(seen)


def _libc_syncfs():
    try:
        return libc().syncfs  # (the GIL is let go)
    except (OSError, AttributeError):
        return None
