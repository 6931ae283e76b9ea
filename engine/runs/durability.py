"""When what a run's stages wrote reaches the disk.

A run skips a stage it has recorded as done, so that stage's writes must survive what can stop the run. A killed
process loses nothing that went through the page cache; a machine that goes down can. A stage's worker on another
host fsyncs its shards before recording them (engine.checkpoint.writer, QUANTDECK_FSYNC=1). On the driver's own
machine the workers write through the page cache, as `quantdeck convert` does, and record `synced: false` with the
machine's boot; the driver then syncs their filesystems on a thread while the next stage runs (`Syncer`), records
`synced: true`, and waits for the last sync before the run ends. Writing that way costs the stage nothing more
than the command, where O_DIRECT and fsync made a real-width conversion stage take 1.2-1.5× the command's time and
left validate to read the output from the disk again.

A resume on a machine that rebooted before a sync finished (`stage_states`) does again the first stage whose
writes may be lost, and every stage after it: their own resume checks the shards they find by digest
(engine.checkpoint.writer) and rewrites what does not match.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from pathlib import Path

from engine.core.fsutil import boot_id, sync_filesystems
from engine.core.names import StageState
from engine.runs.plan import Plan
from engine.runs.rundir import RunDir, mark_synced, read_status


def written_paths(run: RunDir, plan: Plan) -> list[Path]:
    """The run directory and every absolute path a stage's parameters name: their filesystems hold what the
    stages write."""
    out = [run.path]
    for name in plan.names():
        for v in plan.stage(name).params.values():
            if isinstance(v, str) and os.path.isabs(v):
                out.append(Path(v))
    return out


def stage_states(run: RunDir, plan: Plan) -> tuple[dict[str, str], list[str]]:
    """Each stage's state as a resume sees it, and the stages it does again because this machine rebooted before
    their writes were synced: from the first done stage recorded `synced: false` under another boot, every stage
    of the plan (PENDING in the states)."""
    now = boot_id()
    names = plan.names()
    status = {n: read_status(run, n) for n in names}
    states = {n: st["state"] for n, st in status.items()}
    for i, name in enumerate(names):
        st = status[name]
        if StageState(st["state"]).is_done() and st.get("synced") is False and st.get("boot") != now:
            states.update({n: StageState.PENDING.value for n in names[i:]})
            return states, names[i:]
    return states, []


class Syncer:
    """Syncs the filesystems of `paths` on a thread after each stage handed to `after`, then records the stage
    synced; `close` waits for the last sync. A failed sync leaves the stage `synced: false` (a resume after a
    reboot does it again) and is reported on stderr, the driver's log."""

    def __init__(self, run: RunDir, paths: list[Path]):
        self.run, self.paths = run, paths
        self._todo: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def after(self, stage: str, attempt: int) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="run-sync", daemon=True)
            self._thread.start()
        self._todo.put((stage, attempt))

    def _loop(self) -> None:
        while True:
            batch = [self._todo.get()]
            while not self._todo.empty():
                batch.append(self._todo.get())
            done = [b for b in batch if b is not None]
            if done:
                try:
                    sync_filesystems(self.paths)
                except OSError as e:
                    print(f"quantdeck runner: sync after {', '.join(s for s, _ in done)} failed: {e}",
                          file=sys.stderr, flush=True)
                else:
                    for stage, attempt in done:
                        mark_synced(self.run, stage, attempt)
            if None in batch:  # close(): nothing comes after
                return

    def close(self) -> float:
        """Wait for the last sync; returns the seconds waited."""
        t0 = time.monotonic()
        if self._thread is not None:
            print(f"quantdeck runner: run {self.run.id}: waiting for the stages' writes to reach the disk",
                  file=sys.stderr, flush=True)
            self._todo.put(None)
            self._thread.join()
            self._thread = None
        return time.monotonic() - t0
