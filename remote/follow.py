"""Following a stage through its run dir, over whatever reads the files (an SSH launcher, or locally).

The worker's run dir is the single source of truth: status.json, events.jsonl / events.rank<N>.jsonl
(one JSON event per line) and log.txt. A follower keeps a byte offset per file and only ever advances it
past complete lines, so when the connection drops it simply reads nothing new, and when it comes back
it continues from the same offsets: nothing is lost, nothing repeated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Callable

from engine.core.errors import RemoteError
from engine.core.events import Event, parse_lines

ReadBytes = Callable[[str, int], bytes]


@dataclass
class FileTail:
    """Complete lines of one growing file, by byte offset."""

    path: str
    offset: int = 0

    def poll_events(self, read: ReadBytes) -> list[Event]:
        chunk = read(self.path, self.offset)
        events, used = parse_lines(chunk)
        self.offset += used
        return events

    def poll_text(self, read: ReadBytes) -> str:
        chunk = read(self.path, self.offset)
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        return chunk[:end].decode("utf-8", errors="replace")


@dataclass
class FollowUpdate:
    events: list[Event] = field(default_factory=list)
    log: str = ""
    status: dict[str, Any] | None = None
    connected: bool = True
    error: str | None = None


class StageFollower:
    """Polls one stage's status, events (ranks 0..world-1) and log; survives a lost connection."""

    def __init__(self, read: ReadBytes | Any, stage_dir: str, ranks: int = 1):
        self.read: ReadBytes = getattr(read, "read_bytes", read)
        self.stage_dir = PurePosixPath(stage_dir)
        self.events = [FileTail(str(self.stage_dir / ("events.jsonl" if r == 0 else f"events.rank{r}.jsonl")))
                       for r in range(ranks)]
        self.log = FileTail(str(self.stage_dir / "log.txt"))
        self.status: dict[str, Any] | None = None
        self.connected = True
        self.reconnects = 0

    def poll(self) -> FollowUpdate:
        up = FollowUpdate()
        try:
            raw = self.read(str(self.stage_dir / "status.json"), 0)
            for tail in self.events:
                up.events.extend(tail.poll_events(self.read))
            up.log = self.log.poll_text(self.read)
        except RemoteError as e:
            self.connected = False
            return FollowUpdate(status=self.status, connected=False, error=e.msg)
        if not self.connected:
            self.reconnects += 1
        self.connected = True
        if raw:
            try:
                self.status = json.loads(raw)
            except ValueError:
                pass  # a status being replaced is read whole next time (atomic rename)
        up.status = self.status
        return up
