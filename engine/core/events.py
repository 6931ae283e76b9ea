"""The one event schema through which stages report: progress, metrics, log lines and state changes.

An event is one JSON object on one line of `events.jsonl` (rank 0) or `events.rank<N>.jsonl`:

    {"v": 1, "ts": 1732240000.5, "kind": "progress", "stage": "convert", "rank": 0, "host": "node0",
     "unit": "tensors", "done": 120, "total": 900, "bytes_done": 1.2e9, "bytes_total": 9.8e9,
     "rate": 3.1e8, "eta_s": 28.1, "label": "model.layers.3.mlp.experts.7.w1"}

kinds and their fields (besides v, ts, kind, stage, rank, host):
- progress: unit, done, total, bytes_done, bytes_total, rate (bytes/s, or units/s without bytes), eta_s, label,
            and scope "all" when every rank walks every unit (else each rank's progress is its share of the stage)
- metric:   name, value, and optional tags (dict)
- log:      level (debug|info|warning|error), msg
- state:    state (a StageState value), and on failure error_class, error, hint

Readers follow a file by byte offset and ignore a torn last line, so a writer killed mid-line loses at
most that line.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

SCHEMA_VERSION = 1
KINDS = ("progress", "metric", "log", "state")
SCOPE_ALL = "all"  # progress `scope`: every rank walks every unit (absent: each rank reports its share of the stage)


@dataclass(frozen=True)
class Event:
    kind: str
    data: dict[str, Any]
    ts: float = field(default_factory=time.time)
    stage: str | None = None
    rank: int = 0
    host: str = ""

    def to_json(self) -> str:
        obj = {"v": SCHEMA_VERSION, "ts": self.ts, "kind": self.kind, "stage": self.stage,
               "rank": self.rank, "host": self.host}
        obj.update(self.data)
        return json.dumps(obj, separators=(",", ":"), default=str)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> "Event":
        obj = dict(obj)
        kind = obj.pop("kind", "log")
        ts = float(obj.pop("ts", 0.0))
        stage = obj.pop("stage", None)
        rank = int(obj.pop("rank", 0) or 0)
        host = obj.pop("host", "") or ""
        obj.pop("v", None)
        return cls(kind=kind, data=obj, ts=ts, stage=stage, rank=rank, host=host)


class EventSink(Protocol):
    def emit(self, kind: str, **data: Any) -> None: ...


class NullSink:
    def emit(self, kind: str, **data: Any) -> None:
        return None


class CallbackSink:
    """Hands every event to a callable (the CLI's progress bar, a test)."""

    def __init__(self, fn: Callable[[Event], None], stage: str | None = None, rank: int = 0):
        self.fn, self.stage, self.rank = fn, stage, rank

    def emit(self, kind: str, **data: Any) -> None:
        self.fn(Event(kind=kind, data=data, stage=self.stage, rank=self.rank, host=socket.gethostname()))


class JsonlSink:
    """Appends events to a JSONL file, one write+flush per line (safe for a reader following it)."""

    def __init__(self, path: str | os.PathLike, stage: str | None = None, rank: int = 0, host: str | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.stage, self.rank = stage, rank
        self.host = host or socket.gethostname()
        self._lock = threading.Lock()
        self._fh = open(self.path, "a", encoding="utf-8")

    def emit(self, kind: str, **data: Any) -> None:
        line = Event(kind=kind, data=data, stage=self.stage, rank=self.rank, host=self.host).to_json()
        with self._lock:
            self._fh.write(line + "\n")
            self._fh.flush()

    def close(self) -> None:
        with self._lock:
            self._fh.close()


class TeeSink:
    def __init__(self, *sinks: EventSink):
        self.sinks = sinks

    def emit(self, kind: str, **data: Any) -> None:
        for s in self.sinks:
            s.emit(kind, **data)


def parse_lines(chunk: bytes) -> tuple[list[Event], int]:
    """Parse complete lines of `chunk`; returns the events and how many bytes were consumed."""
    events: list[Event] = []
    end = chunk.rfind(b"\n")
    if end < 0:
        return events, 0
    for raw in chunk[: end + 1].splitlines():
        raw = raw.strip()
        if not raw:
            continue
        try:
            events.append(Event.from_dict(json.loads(raw)))
        except (ValueError, TypeError):
            continue  # a line garbled by a crash is skipped, never fatal to the reader
    return events, end + 1


def read_events(path: str | os.PathLike, offset: int = 0) -> tuple[list[Event], int]:
    """Read events from byte `offset`; returns (events, next offset). A missing file is empty."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            chunk = fh.read()
    except FileNotFoundError:
        return [], offset
    events, used = parse_lines(chunk)
    return events, offset + used


class Progress:
    """Counts units and bytes, and emits throttled progress events with rate and ETA. `scope="all"`: every rank
    of the stage walks every unit (calibrate's layers) rather than its share (engine.runs.progress_merge)."""

    def __init__(self, sink: EventSink, unit: str, total: int, bytes_total: int = 0,
                 interval_s: float = 0.5, clock: Callable[[], float] = time.monotonic, *, scope: str | None = None):
        self.sink, self.unit, self.total, self.bytes_total = sink, unit, total, bytes_total
        self.scope = scope
        self.done = 0
        self.bytes_done = 0
        self.interval_s = interval_s
        self.clock = clock
        self.t0 = clock()
        self._last = -1e18
        self._lock = threading.Lock()

    def advance(self, n: int = 1, nbytes: int = 0, label: str | None = None, force: bool = False) -> None:
        with self._lock:
            self.done += n
            self.bytes_done += nbytes
            now = self.clock()
            if not force and self.done < self.total and now - self._last < self.interval_s:
                return
            self._last = now
            self.sink.emit("progress", **self.snapshot(now, label))

    def snapshot(self, now: float | None = None, label: str | None = None) -> dict[str, Any]:
        now = self.clock() if now is None else now
        elapsed = max(now - self.t0, 1e-9)
        if self.bytes_total:
            rate = self.bytes_done / elapsed
            left = max(self.bytes_total - self.bytes_done, 0)
        else:
            rate = self.done / elapsed
            left = max(self.total - self.done, 0)
        eta = left / rate if rate > 0 else None
        snap = {"unit": self.unit, "done": self.done, "total": self.total, "bytes_done": self.bytes_done,
                "bytes_total": self.bytes_total, "rate": rate, "eta_s": eta, "label": label}
        if self.scope:
            snap["scope"] = self.scope
        return snap


def latest_progress(events: Iterable[Event]) -> dict[str, Any] | None:
    last = None
    for ev in events:
        if ev.kind == "progress":
            last = ev.data
    return last
