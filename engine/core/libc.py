"""The C library's functions this process calls through ctypes (prctl, sync_file_range, mallopt, syscall).

`libc()` opens the process's own symbols (`dlopen(NULL)`: libc is among them on Linux), once per process. Finding
the library by name instead (`ctypes.util.find_library`) runs `ldconfig -p` in a child, a fork and an exec in each
process that asked. Raises OSError where there is no such library; callers treat that as "not Linux"."""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def libc() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)
