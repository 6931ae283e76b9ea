"""Process liveness and the flock held for a process's life: what keeps one live worker per stage, one
driver per run and one run per output (their factories are in engine.runs.rundir)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from engine.core.errors import StageLockedError
from engine.core.fsutil import read_json


def this_host() -> str:
    return socket.gethostname()


def pid_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    rest = data[data.rfind(b")") + 2:].split()
    return rest[19].decode() if len(rest) > 19 else None


def pid_alive(pid: int | None, pid_start: str | None = None) -> bool:
    """Whether `pid` runs on this host (zombies count as dead; a reused pid with another start time too)."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
        state = data[data.rfind(b")") + 2:].split()[0]
        if state in (b"Z", b"X"):
            return False
    except OSError:
        pass
    if pid_start is not None:
        now = pid_start_time(pid)
        if now is not None and now != pid_start:
            return False
    return True


def driver_alive(run: Any) -> bool:
    """Whether the run's driver (its driver.json pid, on this host) lives. `run` is an engine.runs.rundir.RunDir."""
    d = read_json(run.driver_path) or {}
    return d.get("host") in (None, this_host()) and pid_alive(d.get("pid"))


@contextlib.contextmanager
def exit_waker(pid: int | None) -> Iterator[Callable[[float], None]]:
    """A `sleep(s)` that ends early when process `pid` (of this host) exits, through a pidfd (Linux), so a poller
    notices the exit at once instead of up to a poll later; a plain sleep without one, and after that exit."""
    fd, poller = None, None
    with contextlib.suppress(AttributeError, OSError):
        fd = os.pidfd_open(pid) if pid and pid > 0 else None
        if fd is not None:
            poller = select.poll()  # poll, not select: a busy process's descriptors may be numbered past 1024
            poller.register(fd, select.POLLIN)

    def sleep(s: float) -> None:
        nonlocal fd
        if fd is None:
            time.sleep(s)
        elif poller.poll(max(0, int(s * 1000))):
            os.close(fd)
            fd = None

    try:
        yield sleep
    finally:
        if fd is not None:
            os.close(fd)


class FileLock:
    """An flock held for a process's life, recording `pid host` in the file. A dead holder's flock is
    released by the kernel, so a stale lock clears itself; `stale` tells whether one was cleared."""

    def __init__(self, path: str | os.PathLike, what: str, hint: str):
        self.path = Path(path)
        self.what, self.hint = what, hint
        self.fd: int | None = None
        self.stale: dict[str, Any] | None = None

    def holder(self) -> dict[str, Any] | None:
        try:
            text = self.path.read_text().split()
        except OSError:
            return None
        if len(text) >= 2 and text[0].isdigit():
            return {"pid": int(text[0]), "host": text[1]}
        return None

    def acquire(self) -> "FileLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            h = self.holder() or {}
            raise StageLockedError(f"{self.what} is already held by pid {h.get('pid', '?')} on {h.get('host', '?')}",
                                   at=str(self.path), hint=self.hint) from None
        prev = self.holder()
        if prev and prev["pid"] != os.getpid():
            self.stale = prev  # its holder died (the kernel released the flock): cleared
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {this_host()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
