"""Keeping the history store (engine.runs.store) in step with a run, as its driver (engine.runs.runner) changes it.

The run dir is the truth; the store can be rescanned from it, so an update that fails is reported on stderr and is
never fatal to the run (`sync_store`). The driver asks for an update after every state change, and makes them on a
thread (`StoreSync`): one asked while another is waiting is the same, and `close` waits for that thread and makes
the last one, so the store ends in step with the run dir. No stage starts later for the history database: on a GPU
host one update, after a stage of a real-width run, took 0.86 s.

The rows themselves come from engine.runs.store (`sync_run`, `records_from_run_dir`); this module only decides
when, and where, they are written.
"""

from __future__ import annotations

import sys
import threading

from engine.runs.rundir import RunDir
from engine.runs.store import Store, sync_run


def sync_store(run: RunDir) -> None:
    """Bring the store in step with the run dir (never fatal to the run)."""
    try:
        with Store() as store:
            sync_run(store, run.path)
    except Exception as e:  # noqa: BLE001 - the run dir is the truth; the store can be rescanned
        print(f"quantdeck runner: store not updated: {e}", file=sys.stderr, flush=True)


class StoreSync:
    """The driver's store updates, off its way (see the module doc): `request` asks for one, made on a thread;
    `close` waits for that thread and makes the last one."""

    def __init__(self, run: RunDir):
        self.run = run
        self._wake, self._closing = threading.Event(), False
        self._thread = threading.Thread(target=self._loop, name="run-store", daemon=True)
        self._thread.start()

    def request(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._closing:
                return
            sync_store(self.run)

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        self._thread.join()
        sync_store(self.run)
