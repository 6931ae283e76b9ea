"""StoreSync: the driver's store updates on a thread, those asked while one is waiting made once, the last one
made by close, after the thread's."""

from __future__ import annotations

import threading
import time

from engine.runs import store_sync


def test_requests_coalesce_and_close_makes_the_last_one(monkeypatch):
    calls: list[str] = []
    busy, release = threading.Event(), threading.Event()

    def slow_sync(run):
        calls.append(threading.current_thread().name)
        if len(calls) == 1:  # the first update waits on a busy disk
            busy.set()
            release.wait(10)

    monkeypatch.setattr(store_sync, "sync_store", slow_sync)
    s = store_sync.StoreSync(run="r")
    s.request()
    assert busy.wait(10)
    for _ in range(50):  # asked while the first one runs: one more update, not fifty
        s.request()
    release.set()
    deadline = time.monotonic() + 10
    while len(calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert calls == ["run-store", "run-store"]
    s.close()
    assert calls == ["run-store", "run-store", threading.current_thread().name]
    assert not s._thread.is_alive()


def test_close_without_requests_still_brings_the_store_in_step(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(store_sync, "sync_store", lambda run: calls.append(run))
    s = store_sync.StoreSync(run="r")
    s.close()
    assert calls == ["r"]
