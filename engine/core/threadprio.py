"""A thread that gives way: its CPU priority lowered (nice raised) for the rest of its life.

validate's pass and its decoder-block child run side by side, and the child (importing torch and transformers,
seconds of one core) is the longer of the two on a small machine: with the pass's threads at the same priority it
ran 3.5 s instead of its 3.0 s alone (2 cores, the mid-cpu checkpoint). The pass's threads give way to it instead
(engine.convert.validate). A raised nice cannot be lowered again without privileges, so only threads that end with
their work are lowered. Linux only: elsewhere a nice is the whole process's.
"""

from __future__ import annotations

import os
import sys
import threading


def give_way(by: int) -> bool:
    """Raise this thread's nice by `by` (at most to 19); False where it cannot be done (not Linux, refused)."""
    if by <= 0 or not sys.platform.startswith("linux"):
        return False
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
    except OSError:
        return False
    return True
