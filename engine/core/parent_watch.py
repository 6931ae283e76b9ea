"""A child process that must not outlive its parent (a `--workers N` convert worker writing into the parent's
`<dst>.partial/`): once the parent is gone, from a kill -9 or the OOM killer, it dies too, instead of writing on
beside the parent's next run."""

from __future__ import annotations

import os
import signal
import threading
import time

from engine.core.libc import libc

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_S = 0.5


def _set_pdeathsig(sig: int) -> bool:
    """Linux: have the kernel send `sig` to this process when the thread that started it exits."""
    try:
        return libc().prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return False


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _watch(parent: int) -> None:  # pragma: no cover - only where prctl is missing
    while os.getppid() == parent:
        time.sleep(POLL_S)
    _die()


def die_with_parent(parent: int) -> None:
    """SIGKILL this process as soon as `parent` (the pid that started it, read there and passed in) is gone.
    Linux: PR_SET_PDEATHSIG, then one check that `parent` is still our parent: had it died before the prctl
    call, no signal would come. Elsewhere a daemon thread polls for the re-parenting."""
    armed = _set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent:
        _die()
    if not armed:  # pragma: no cover - not Linux
        threading.Thread(target=_watch, args=(parent,), name="parent-watch", daemon=True).start()
