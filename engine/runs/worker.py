"""The stage worker: `python -m engine.runs.worker STAGE --run-dir D` runs one stage of a run, in its own process.

It looks the stage up in the Stage registry, hands it its resolved params from plan.json, and reports
only through the run dir: status.json (rank 0, under the stage lock that refuses a second live worker),
events.jsonl / events.rank<N>.jsonl, and log.txt (its stdout/stderr, redirected by the launcher).
A failure is classified (engine.runs.rootcause) into status.json. Under torchrun it reads RANK, WORLD_SIZE
and LOCAL_RANK; only rank 0 writes status. The stage's collectives time out after the run's
`[run] stall_after_s` (handed on in QUANTDECK_COLLECTIVE_TIMEOUT_S unless that is set already).
Started ahead with `--standby LOG` (engine.runs.local_launcher `prepare`), it imports its stage and then waits for
the driver's go before any of that (`standby`).

Test hook (documented, honest): QUANTDECK_FAULTS=pause_stage=STAGE,pause_after_units=N (engine.core.settings)
makes that stage's worker stop (sleep until killed) at its first progress event with done ≥ N (N=0, the default:
right after it enters RUNNING), after touching stages/<stage>/test-paused. The integration tests use
it to kill -9 a worker mid-stage deterministically; under it, progress events are not throttled (so
"after N units" is exact).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Any

from engine.checkpoint.writer import durable
from engine.core.errors import ExitCode, QuantdeckError, StageLockedError
from engine.core.events import EventSink, JsonlSink, Progress, TeeSink
from engine.core.fsutil import boot_id
from engine.core.locks import this_host
from engine.core.names import StageState
from engine.core.procexit import end_process
from engine.core.settings import FSYNC_ENV, settings
from engine.runs.plan import Plan
from engine.runs.rootcause import classify
from engine.runs.rundir import (
    COLLECTIVE_TIMEOUT_ENV,
    RunDir,
    begin_attempt,
    read_status,
    set_running,
    set_status,
    stage_lock,
)
from engine.runs.runner import update_meta
from engine.stages import load_all
from engine.stages.base import Stage, StageContext


class _LogLines:
    """Echoes log events (info and up) to stderr, so the stage's log.txt reads as a log."""

    def __init__(self, stage: str, rank: int):
        self.prefix = f"[{stage}{'' if rank == 0 else f' r{rank}'}]"

    def emit(self, kind: str, **data: Any) -> None:
        if kind == "log" and data.get("level", "info") != "debug":
            stamp = time.strftime("%H:%M:%S", time.gmtime())
            print(f"{stamp} {self.prefix} {data.get('level', 'info')}: {data.get('msg')}", file=sys.stderr, flush=True)


class _PauseSink:
    """Test-only: forwards events, then parks the process once `after` units are reported done."""

    def __init__(self, inner: EventSink, after: int, marker: Path):
        self.inner, self.after, self.marker = inner, after, marker

    def emit(self, kind: str, **data: Any) -> None:
        self.inner.emit(kind, **data)
        if kind == "progress" and int(data.get("done") or 0) >= self.after:
            park(self.marker)


def park(marker: Path) -> None:
    marker.write_text(f"{os.getpid()}\n")
    while True:  # until kill -9
        time.sleep(3600)


def _unthrottle_progress() -> None:
    """Test hook only: every Progress.advance emits, so the pause lands exactly after N units."""
    d = list(Progress.__init__.__defaults__ or ())
    if len(d) >= 3:  # (bytes_total, interval_s, clock)
        d[-2] = 0.0
        Progress.__init__.__defaults__ = tuple(d)


def load_stage_class(name: str) -> type:
    """The registered Stage class for `name`, importing only its module when it exists."""
    try:
        importlib.import_module(f"engine.stages.{name.replace('-', '_')}")
    except ModuleNotFoundError as e:
        if e.name != f"engine.stages.{name.replace('-', '_')}":
            raise
        load_all()
    return Stage.get(name)


def _rank_env() -> tuple[int, int, int]:
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def wait_for_head(run: RunDir, stage: str, attempt: int, timeout_s: float = 30.0) -> None:
    """A rank other than 0 whose failure the other ranks know (engine.convert.ranks sets `ranks_told` on the
    exception) waits until rank 0 has recorded the stage's final status: torchrun stops every rank as soon as
    one exits with an error, which could otherwise cut rank 0 off before it writes the failing rank's error."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = read_status(run, stage)
        if StageState(st["state"]).is_terminal() or int(st["attempt"]) != attempt:
            return
        time.sleep(0.1)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"worker received {signal.Signals(signum).name}")


def run_worker(stage: str, run_dir: str | Path, mode: str = "run", ahead: Any = None) -> int:
    """Run one stage in this process; returns the exit code (0 = SUCCEEDED). `ahead`: what the stage began as a
    standby (`standby`), for its run."""
    # A run skips a stage it has recorded as done, so the checkpoints a stage writes are on the disk before that
    # (engine.checkpoint.writer: durable shards), unless the operator says otherwise; or, where the driver says 0
    # (its own machine), the driver syncs them behind a later stage (engine.runs.durability).
    os.environ.setdefault(FSYNC_ENV, "1")
    run = RunDir(Path(run_dir).resolve())
    os.environ.setdefault(COLLECTIVE_TIMEOUT_ENV, f"{run.stall_after_s():g}")
    rank, world, local_rank = _rank_env()
    host = settings().node or this_host()
    signal.signal(signal.SIGTERM, _raise_interrupt)
    plan = Plan.from_json(run.read_plan())
    sp = plan.stage(stage)
    lock = None
    attempt = 0
    if rank == 0:
        try:
            lock = stage_lock(run, stage).acquire()
        except StageLockedError as e:
            print(f"quantdeck worker: {e.one_line()}", file=sys.stderr, flush=True)
            return int(ExitCode.CONFLICT)
        if lock.stale:
            print(f"quantdeck worker: cleared a stale lock of dead pid {lock.stale['pid']} "
                  f"on {lock.stale['host']}", file=sys.stderr, flush=True)
        st = read_status(run, stage)
        if st["state"] == StageState.STARTING.value:
            attempt = int(st["attempt"])
        else:  # started by hand, not by the runner
            attempt = begin_attempt(run, stage, host=host, pid=os.getpid(), launcher="manual", force=True)
        set_running(run, stage, attempt=attempt, host=host, pid=os.getpid(), world_size=world)
    else:
        attempt = int(read_status(run, stage)["attempt"])

    sink: EventSink = TeeSink(JsonlSink(run.events_path(stage, rank), stage=stage, rank=rank, host=host),
                              _LogLines(stage, rank))
    sink.emit("state", state=StageState.RUNNING.value, attempt=attempt, pid=os.getpid(), world_size=world)
    print(f"quantdeck worker: stage {stage} of run {run.id}, attempt {attempt}, rank {rank}/{world}, "
          f"pid {os.getpid()} on {host}", file=sys.stderr, flush=True)
    faults = settings().faults
    if faults.pause_stage == stage:
        after = faults.pause_after_units
        marker = run.stage_dir(stage) / "test-paused"
        if after <= 0:
            park(marker)
        _unthrottle_progress()
        sink = _PauseSink(sink, after, marker)

    ctx = StageContext(run_dir=run.path, stage_dir=run.stage_dir(stage), params=sp.params, sink=sink,
                       rank=rank, world_size=world, local_rank=local_rank, host=host, mode=mode,
                       update_meta=partial(update_meta, run), ahead=ahead)
    try:
        cls = load_stage_class(stage)
        result = cls().run(ctx) or {}
    except BaseException as e:  # noqa: BLE001 - every failure is classified and recorded
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        cause = classify(tb, exc=e)
        own = getattr(e, "hint", None)
        hint = (own or cause.hint) if cause.cls in ("unknown", "error", "bad-checkpoint", "file-missing") \
            else cause.hint
        hint = (hint or "").replace("RUN", run.id)
        fields = {"error_class": cause.cls, "error": cause.summary, "hint": hint}
        final = StageState.FAILED.value
        if rank == 0:  # a cancel already recorded stays CANCELLED (terminal states are final)
            final = set_status(run, stage, StageState.FAILED, attempt=attempt, exit_code=1, **fields)["state"]
        sink.emit("state", state=final, **fields)
        print(f"quantdeck worker: stage {stage} failed: {cause.cls}: {cause.summary} (hint: {hint})",
              file=sys.stderr, flush=True)
        if rank != 0 and getattr(e, "ranks_told", False):
            wait_for_head(run, stage, attempt)
        if lock is not None:
            lock.release()
        if isinstance(e, KeyboardInterrupt):
            return int(ExitCode.INTERRUPTED)
        return int(getattr(e, "exit_code", ExitCode.ERROR)) if isinstance(e, QuantdeckError) else int(ExitCode.ERROR)
    sink.emit("state", state=StageState.SUCCEEDED.value, result=result)
    if rank == 0:
        set_status(run, stage, StageState.SUCCEEDED, attempt=attempt, result=result, exit_code=0,
                   synced=durable(), boot=boot_id())
    print(f"quantdeck worker: stage {stage} succeeded" + (f" (rank {rank})" if world > 1 else ""),
          file=sys.stderr, flush=True)
    if lock is not None:
        lock.release()
    return 0


def standby(stage: str, log: str, run_dir: str | Path | None = None, mode: str = "run") -> tuple[bool, Any]:
    """A worker started ahead (engine.runs.local_launcher `prepare`): import the stage, begin what it may begin
    ahead (`Stage.ahead`, with its parameters from the run's plan in `run_dir`), then wait for the driver's `go`
    line on stdin. (True, what was begun) on it, with stdout/stderr moved to `log` (what the spool caught first)
    and stdin to /dev/null, as a worker started then would have them. (False, None) on end of file (the driver
    dropped it, or died): nothing of the run is touched. An import error is left for run_worker to meet and
    record after the go; an error of the work ahead leaves the stage to do all its work after it."""
    ahead = None
    try:
        cls = load_stage_class(stage)
        if run_dir is not None and mode == "run":
            ahead = cls().ahead(Plan.from_json(RunDir(Path(run_dir).resolve()).read_plan()).stage(stage).params)
    except Exception:  # noqa: BLE001 - met again, and recorded, inside run_worker
        pass
    if sys.stdin.buffer.readline().strip() != b"go":
        if ahead is not None:
            ahead.stop()
        return False, None
    sys.stdout.flush()
    sys.stderr.flush()
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.lseek(1, 0, os.SEEK_SET)
        while chunk := os.read(1, 1 << 16):
            os.write(fd, chunk)
    except OSError:  # not a spool: nothing to carry over
        pass
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return True, ahead


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.runs.worker", description="Run one stage of a quantdeck run.")
    ap.add_argument("stage")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--mode", default="run")
    ap.add_argument("--standby", metavar="LOG", default=None,
                    help="start ahead: wait for a `go` line on stdin before touching the run dir; output to LOG then")
    args = ap.parse_args(argv)
    ahead = None
    if args.standby is not None:
        go, ahead = standby(args.stage, args.standby, args.run_dir, args.mode)
        if not go:
            return 0
    try:
        return run_worker(args.stage, args.run_dir, args.mode, ahead=ahead)
    except QuantdeckError as e:  # before the stage started: bad run dir, unknown stage
        print(f"quantdeck worker: error: {e.one_line()}", file=sys.stderr, flush=True)
        return int(e.exit_code)
    finally:
        if ahead is not None:  # what the stage did not take (it never ran, or failed): ended, not finished
            ahead.stop()


if __name__ == "__main__":
    end_process(main())  # its status, events and outputs are written (the driver syncs them where it must)
