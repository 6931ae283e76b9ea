"""When what a run's stages wrote reaches the disk.

A run skips a stage it has recorded as done, so that stage's writes must survive what can stop the run. A killed
process loses nothing that went through the page cache; a machine that goes down can. A stage's worker on another
host fsyncs its shards before recording them (engine.checkpoint.writer, QUANTDECK_FSYNC=1). On the driver's own
machine the workers write through the page cache, as `quantdeck convert` does, and record `synced: false` with the
machine's boot; the driver then syncs their filesystems on a thread while a later stage runs (`Syncer`), records
`synced: true`, and waits for the last sync before the run ends. Writing that way costs the stage nothing more
than the command, where O_DIRECT and fsync made a real-width conversion stage take 1.2-1.5× the command's time and
left validate to read the output from the disk again.

The sync waits for a stage that reads what came before and writes little (validate, eval, push: `QUIET`), once its
worker has recorded itself running: while gigabytes go to the disk, every small fsync on that filesystem (a
stage's status, a manifest) waits for them, so a sync begun behind inject-mtp and copy-extras held up their
start and end by seconds at real width. Without such a stage the run's end does the sync.

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
from engine.core.names import StageName, StageState
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


def _unsynced(st: dict) -> bool:
    """A done stage whose writes its driver has not recorded on the disk yet."""
    return StageState(st["state"]).is_done() and st.get("synced") is False


def unsynced_here(run: RunDir, plan: Plan) -> list[tuple[str, int]]:
    """(stage, attempt) of each done stage recorded `synced: false` under this boot: a driver that died (or was
    killed) before its sync left them so; the next driver syncs them."""
    now = boot_id()
    status = {n: read_status(run, n) for n in plan.names()}
    return [(n, int(st["attempt"])) for n, st in status.items() if _unsynced(st) and st.get("boot") == now]


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
        if _unsynced(st) and st.get("boot") != now:
            states.update({n: StageState.PENDING.value for n in names[i:]})
            return states, names[i:]
    return states, []


# stages that read what the stages before them wrote and write little themselves: a sync runs behind them
QUIET = frozenset(x.value for x in (StageName.VALIDATE, StageName.EVAL, StageName.PUSH))
_STARTING = (StageState.PENDING.value, StageState.STARTING.value)


class Syncer:
    """Syncs the filesystems of `paths` on a thread for the stages handed to `after`, once a `QUIET` stage handed
    to `beside` runs (or at `close`), then records those stages synced; `close` waits for the last sync. A failed
    sync leaves the stages `synced: false` (a resume after a reboot does them again) and is reported on stderr,
    the driver's log."""

    def __init__(self, run: RunDir, paths: list[Path], poll_s: float = 0.02, start_wait_s: float = 30.0):
        self.run, self.paths = run, paths
        self.poll_s, self.start_wait_s = poll_s, start_wait_s
        self._todo: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()

    def after(self, stage: str, attempt: int) -> None:
        """`stage` (this attempt) ended with writes not yet synced."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="run-sync", daemon=True)
            self._thread.start()
        self._todo.put(("after", stage, attempt))

    def beside(self, stage: str) -> None:
        """`stage`'s worker was started: a sync of what is pending runs beside it if it is QUIET."""
        if self._thread is not None and stage in QUIET:
            self._todo.put(("beside", stage, 0))

    def _loop(self) -> None:
        pending: list[tuple[str, int]] = []
        while True:
            item = self._todo.get()
            if item is not None and item[0] == "after":
                pending.append(item[1:])
                continue
            if item is not None and pending:
                try:
                    self._until_running(item[1])
                except Exception as e:  # noqa: BLE001 - waiting only spares the stage's start: sync now instead
                    print(f"quantdeck runner: cannot read {item[1]}'s status ({e}); syncing now", file=sys.stderr,
                          flush=True)
            if pending:
                self._sync(pending)
                pending = []
            if item is None:  # close(): nothing comes after
                return

    def _until_running(self, stage: str) -> None:
        """Until `stage`'s worker has recorded its start (or ended, or start_wait_s went by, or `close` came)."""
        end = time.monotonic() + self.start_wait_s
        while read_status(self.run, stage)["state"] in _STARTING and time.monotonic() < end:
            if self._closing.wait(self.poll_s):
                return

    def _sync(self, stages: list[tuple[str, int]]) -> None:
        try:
            sync_filesystems(self.paths)
        except OSError as e:
            print(f"quantdeck runner: sync after {', '.join(s for s, _ in stages)} failed: {e}",
                  file=sys.stderr, flush=True)
            return
        for stage, attempt in stages:
            try:
                mark_synced(self.run, stage, attempt)
            except Exception as e:  # noqa: BLE001 - left `synced: false`: a resume after a reboot does it again
                print(f"quantdeck runner: cannot record {stage} synced: {e}", file=sys.stderr, flush=True)

    def close(self) -> float:
        """Wait for the last sync; returns the seconds waited."""
        t0 = time.monotonic()
        if self._thread is not None:
            print(f"quantdeck runner: run {self.run.id}: waiting for the stages' writes to reach the disk",
                  file=sys.stderr, flush=True)
            self._closing.set()
            self._todo.put(None)
            self._thread.join()
            self._thread = None
        return time.monotonic() - t0
