"""give_way: the calling thread's nice goes up by the amount asked (at most to 19); other threads keep theirs."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from engine.core.threadprio import give_way

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own nice is Linux's")


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def _in_thread(fn):
    got = []
    t = threading.Thread(target=lambda: got.append(fn()))
    t.start()
    t.join()
    return got[0]


def test_raises_this_threads_nice_only():
    base = _nice()
    assert _in_thread(lambda: (give_way(3), _nice())) == (True, min(19, base + 3))
    assert _nice() == base  # the calling thread (and so the process) is untouched


def test_stops_at_19_and_zero_does_nothing():
    base = _nice()
    assert _in_thread(lambda: (give_way(50), _nice())) == (True, 19)
    assert _in_thread(lambda: (give_way(0), _nice())) == (False, base)
