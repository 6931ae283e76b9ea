"""A distributed stage's progress as one: each rank's latest progress event merged into the whole stage's.

Under torchrun every rank of a stage writes its own events (stages/<stage>/events.jsonl for rank 0,
events.rank<N>.jsonl for the others). `merge_progress` (pure) turns each rank's latest progress event into
one progress dict of the event's shape (unit, done, total, bytes_done, bytes_total, rate, eta_s, label), plus
`world` (the stage's ranks) and `ranks` (one entry per reporting rank: rank, host, done, total, rate, eta_s):

- a rank's share (the default: convert, export, dequant, cast-fp8 split their shards): done, total and bytes
  are summed; the rate is the sum over the ranks still working (every rank's while none is); the ETA is what
  is left of the sum over that rate.
- `scope: "all"` in the events (calibrate: every rank walks every layer with its own samples): the stage is
  as far as its slowest rank: done is the least, the rate the least, the ETA the longest.

One rank alone (world 1) gives its event's fields unchanged.

`StageProgress` follows one stage's rank files by byte offset, one offset per file: the first read of a file
starts at most `tail` bytes from its end, every later one reads only what was appended, so a console polling
it every second reads a few new lines per rank. A rank's progress counts only from its latest attempt (the
`state: RUNNING` event a worker writes first carries the attempt) and only for ranks below the stage's world
size, so the lines of an earlier attempt, or of ranks an earlier attempt had more of, never add in.

It also keeps, per rank, when the rank last wrote any event of its latest attempt (`activity`): what tells a
stalled stage (engine.runs.runview) from a working one.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from engine.core.events import SCOPE_ALL, Event, parse_lines
from engine.core.names import StageState

TAIL_BYTES = 65536


def _num(d: Mapping[str, Any], key: str) -> float:
    v = d.get(key)
    return float(v) if isinstance(v, (int, float)) else 0.0


def _int_or_float(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def merge_progress(latest: Mapping[int, Event], world: int | None = None) -> dict[str, Any] | None:
    """The whole stage's progress from each rank's latest progress event ({rank: Event}); None without any.
    `world`: the stage's number of ranks when known (ranks that have not reported yet count in it)."""
    if not latest:
        return None
    ranks = sorted(latest)
    world = max(world or 0, ranks[-1] + 1, len(ranks))
    if world == 1:
        return dict(latest[ranks[0]].data)
    evs = [latest[r] for r in ranks]
    ds = [e.data for e in evs]
    newest = max(evs, key=lambda e: e.ts)
    per_rank = [{"rank": e.rank, "host": e.host, "done": d.get("done"), "total": d.get("total"),
                 "rate": d.get("rate"), "eta_s": d.get("eta_s")} for e, d in zip(evs, ds, strict=True)]
    out: dict[str, Any] = {"unit": ds[0].get("unit"), "label": newest.data.get("label"), "world": world,
                           "ranks": per_rank}
    if any(d.get("scope") == SCOPE_ALL for d in ds):
        etas = [_num(d, "eta_s") for d in ds if d.get("eta_s") is not None]
        out.update(scope=SCOPE_ALL, done=_int_or_float(min(_num(d, "done") for d in ds)),
                   total=_int_or_float(max(_num(d, "total") for d in ds)),
                   bytes_done=_int_or_float(min(_num(d, "bytes_done") for d in ds)),
                   bytes_total=_int_or_float(max(_num(d, "bytes_total") for d in ds)),
                   rate=min(_num(d, "rate") for d in ds), eta_s=max(etas) if etas else None)
        return out
    done, total = sum(_num(d, "done") for d in ds), sum(_num(d, "total") for d in ds)
    bdone, btotal = sum(_num(d, "bytes_done") for d in ds), sum(_num(d, "bytes_total") for d in ds)
    working = [d for d in ds if _num(d, "done") < _num(d, "total")] or ds
    rate = sum(_num(d, "rate") for d in working)
    left = max(btotal - bdone, 0.0) if btotal else max(total - done, 0.0)
    eta = 0.0 if left == 0 else (left / rate if rate > 0 else None)
    out.update(done=_int_or_float(done), total=_int_or_float(total), bytes_done=_int_or_float(bdone),
               bytes_total=_int_or_float(btotal), rate=rate, eta_s=eta)
    return out


@dataclass
class _RankFile:
    offset: int = -1  # -1: not read yet
    attempt: int | None = None  # from the latest `state: RUNNING` event
    latest: Event | None = None  # the latest progress event of that attempt
    last_ts: float | None = None  # when the rank wrote its latest event (any kind) of that attempt
    host: str = ""
    pid: int | None = None  # from the latest `state: RUNNING` event


@dataclass(frozen=True)
class RankActivity:
    """When one rank of a stage last reported, and whether it has finished its share (then it only waits)."""

    rank: int
    host: str
    pid: int | None
    last_ts: float
    finished: bool


class StageProgress:
    """Follows the progress of one stage over all its rank files; thread-safe; see the module doc."""

    def __init__(self, stage_dir: str | os.PathLike, tail: int = TAIL_BYTES):
        self.stage_dir = Path(stage_dir)
        self.tail = tail
        self._files: dict[int, _RankFile] = {}
        self._lock = threading.Lock()

    def _paths(self, world: int | None) -> dict[int, Path]:
        if world and world > 0:
            return {r: self.stage_dir / ("events.jsonl" if r == 0 else f"events.rank{r}.jsonl") for r in range(world)}
        out = {0: self.stage_dir / "events.jsonl"}
        try:
            names = os.listdir(self.stage_dir)
        except OSError:
            return out
        for n in names:
            m = re.fullmatch(r"events\.rank(\d+)\.jsonl", n)
            if m:
                out[int(m.group(1))] = self.stage_dir / n
        return out

    def _read(self, rank: int, path: Path) -> None:
        f = self._files.setdefault(rank, _RankFile())
        try:
            size = path.stat().st_size
        except OSError:
            return
        if size == f.offset:
            return
        if size < f.offset:  # the file was replaced: start over
            self._files[rank] = f = _RankFile()
        start = f.offset if f.offset >= 0 else max(0, size - self.tail)
        with open(path, "rb") as fh:
            fh.seek(start)
            chunk = fh.read(size - start)
        if f.offset < 0 and start > 0:  # a tail read: its first line may be cut
            cut = chunk.find(b"\n") + 1
            chunk, start = chunk[cut:], start + cut
        events, used = parse_lines(chunk)
        f.offset = start + used
        for ev in events:
            f.last_ts, f.host = ev.ts, ev.host or f.host
            if ev.kind == "state" and ev.data.get("state") == StageState.RUNNING:
                f.attempt = int(ev.data["attempt"]) if isinstance(ev.data.get("attempt"), int) else None
                f.pid = ev.data.get("pid") if isinstance(ev.data.get("pid"), int) else None
                f.latest = None
            elif ev.kind == "progress":
                f.latest = ev

    def poll(self, attempt: int | None = None, world: int | None = None) -> dict[str, Any] | None:
        """Read what the rank files gained since the last poll; the stage's merged progress for `attempt`
        (None: whatever attempt) over ranks 0..`world`-1 (None: every rank file found)."""
        with self._lock:
            for rank, path in self._paths(world).items():
                self._read(rank, path)
            latest = {r: f.latest for r, f in self._files.items()
                      if f.latest is not None and (world is None or r < world)
                      and (attempt is None or f.attempt is None or f.attempt == attempt)}
            return merge_progress(latest, world)

    def activity(self, attempt: int | None = None, world: int | None = None) -> dict[int, RankActivity]:
        """Each rank's latest report of `attempt` as of the last poll (ranks silent in it are absent)."""
        with self._lock:
            out = {}
            for r, f in self._files.items():
                if f.last_ts is None or (world is not None and r >= world):
                    continue
                if attempt is not None and f.attempt is not None and f.attempt != attempt:
                    continue
                d = f.latest.data if f.latest is not None else {}
                finished = isinstance(d.get("total"), (int, float)) and _num(d, "done") >= _num(d, "total") > 0
                out[r] = RankActivity(rank=r, host=f.host, pid=f.pid, last_ts=f.last_ts, finished=finished)
            return out


class StageRanks:
    """Merges a stream of followed events (engine.api follow: every stage, every rank) into each stage's whole
    progress: `feed(ev)` returns the stage's merged progress after a progress event (None for other events).
    A rank's `state: RUNNING` event (a new attempt) drops its earlier progress."""

    def __init__(self) -> None:
        self._latest: dict[str | None, dict[int, Event]] = {}

    def feed(self, ev: Event) -> dict[str, Any] | None:
        latest = self._latest.setdefault(ev.stage, {})
        if ev.kind == "state" and ev.data.get("state") == StageState.RUNNING:
            latest.pop(ev.rank, None)
            return None
        if ev.kind != "progress":
            return None
        latest[ev.rank] = ev
        return merge_progress(latest)
