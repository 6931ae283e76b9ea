"""Telemetry values: per-node samples, the pure parsers that build them, and a replaying source.

A node's sample says, every ~2 s, what its GPUs hold (index, name, memory used/total, utilization,
temperature, power), how much host RAM is used, and how much disk is free under the work dir. Its
state is one of ok, no GPU (a CPU node: fine, not an error), unreachable (never answered) and stale
(the last good values, with their age). The live poller lives in remote.monitor; this module has no
I/O besides the clock, so the console and its tests can replay real recordings through the same API.

All sizes are bytes. `ts` is time.time() of the sample; `age` the seconds since the last good one.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from enum import Enum
from typing import Iterable, Protocol

from remote.recorded import QUERY_FIELDS, RECORDINGS

MIB = 1 << 20
KIB = 1 << 10
NVIDIA_SMI_QUERY = ["nvidia-smi", f"--query-gpu={QUERY_FIELDS}", "--format=csv,noheader,nounits"]
HISTORY = 120


class NodeState(str, Enum):
    OK = "ok"
    NO_GPU = "no-gpu"
    UNREACHABLE = "unreachable"
    STALE = "stale"

    def __str__(self) -> str:
        return self.value

    @property
    def label(self) -> str:
        return {"ok": "ok", "no-gpu": "no GPU", "unreachable": "unreachable", "stale": "stale"}[self.value]


@dataclass(frozen=True)
class GpuSample:
    index: int
    name: str
    uuid: str
    mem_used: int  # bytes
    mem_total: int  # bytes
    util: float | None = None  # percent
    temp: float | None = None  # degrees C
    power: float | None = None  # watts

    @property
    def mem_fraction(self) -> float:
        return self.mem_used / self.mem_total if self.mem_total else 0.0


@dataclass(frozen=True)
class NodeSample:
    node: str
    state: NodeState
    gpus: tuple[GpuSample, ...] = ()
    ram_used: int | None = None
    ram_total: int | None = None
    disk_free: int | None = None
    ts: float = 0.0
    error: str | None = None
    age: float = 0.0

    @property
    def fresh(self) -> bool:
        return self.state in (NodeState.OK, NodeState.NO_GPU)


# ---------------------------------------------------------------------------------------------- parsers

def _number(text: str) -> float | None:
    """'7649', '7649 MiB', '100 %', '70.81 W', '[N/A]', '[Not Supported]' → float or None."""
    t = text.strip()
    if not t or t.startswith("[") or t.upper() in ("N/A", "NA"):
        return None
    t = t.split()[0]
    try:
        return float(t)
    except ValueError:
        return None


def parse_nvidia_smi_csv(text: str) -> list[GpuSample]:
    """Parse `nvidia-smi --query-gpu=<QUERY_FIELDS> --format=csv[,noheader][,nounits]` output.

    Accepts the header line and units (`--format=csv`), skips blank and garbage lines (warnings, a torn
    last line, an error message) instead of failing: a line counts only if it has the eight fields, an
    integer index and a memory total.
    """
    gpus: list[GpuSample] = []
    for raw in text.splitlines():
        fields = [f.strip() for f in raw.split(",")]
        if len(fields) != 8 or fields[0].lower() == "index":
            continue
        try:
            index = int(fields[0])
        except ValueError:
            continue
        used, total = _number(fields[3]), _number(fields[4])
        if total is None or not fields[1]:
            continue
        gpus.append(GpuSample(
            index=index, name=fields[1], uuid=fields[2],
            mem_used=int((used or 0.0) * MIB), mem_total=int(total * MIB),
            util=_number(fields[5]), temp=_number(fields[6]), power=_number(fields[7]),
        ))
    return gpus


def parse_df_free(text: str) -> int | None:
    """Free bytes from `df -P -k PATH` (POSIX format: 1024-byte blocks; the 4th column of the last line)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        parts = line.split()
        if len(parts) >= 6 and parts[3].isdigit():
            return int(parts[3]) * KIB
    return None


def split_sections(text: str, marker: str = "@@qd ") -> dict[str, str]:
    """Split the output of the remote probe script into its named sections (`@@qd NAME` lines)."""
    out: dict[str, str] = {}
    name = None
    buf: list[str] = []
    for line in text.splitlines():
        if line.startswith(marker):
            if name is not None:
                out[name] = "\n".join(buf)
            name, buf = line[len(marker):].strip(), []
        elif name is not None:
            buf.append(line)
    if name is not None:
        out[name] = "\n".join(buf)
    return out


def stale_from(last_good: NodeSample, now: float, error: str) -> NodeSample:
    """The sample shown for a node whose newest poll failed after it had answered before."""
    return replace(last_good, state=NodeState.STALE, error=error, age=max(0.0, now - last_good.ts))


# ---------------------------------------------------------------------------------------------- sources

class TelemetrySource(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def nodes(self) -> list[str]: ...
    def snapshot(self) -> list[NodeSample]: ...
    def history(self, node: str, n: int = 60) -> list[NodeSample]: ...


class SampleBook:
    """The newest sample and a bounded history per node; thread-safe. Shared by the live and replay sources."""

    def __init__(self, nodes: Iterable[str], keep: int = HISTORY):
        self._nodes = list(nodes)
        self._lock = threading.Lock()
        self._hist: dict[str, deque[NodeSample]] = {n: deque(maxlen=keep) for n in self._nodes}
        self._last_good: dict[str, NodeSample] = {}

    def nodes(self) -> list[str]:
        return list(self._nodes)

    def record(self, sample: NodeSample) -> NodeSample:
        """Store a fresh sample, or turn a failed poll into stale/unreachable from the last good one."""
        with self._lock:
            if sample.state in (NodeState.UNREACHABLE, NodeState.STALE):
                good = self._last_good.get(sample.node)
                if good is not None:
                    sample = stale_from(good, sample.ts, sample.error or "no answer")
                else:
                    sample = replace(sample, state=NodeState.UNREACHABLE, gpus=(), age=0.0)
            else:
                self._last_good[sample.node] = sample
            self._hist[sample.node].append(sample)
            return sample

    def latest(self, node: str, now: float | None = None) -> NodeSample:
        with self._lock:
            hist = self._hist[node]
            if not hist:
                return NodeSample(node=node, state=NodeState.UNREACHABLE, ts=now or time.time(),
                                  error="no sample yet")
            last = hist[-1]
        if last.state is NodeState.STALE and now is not None:
            good = self._last_good.get(node)
            if good is not None:
                return replace(last, age=max(0.0, now - good.ts))
        return last

    def snapshot(self, now: float | None = None) -> list[NodeSample]:
        return [self.latest(n, now) for n in self._nodes]

    def history(self, node: str, n: int = 60) -> list[NodeSample]:
        with self._lock:
            return list(self._hist[node])[-n:]


def sample_from_recording(node: str, frame: str | None, ts: float, ram_total: int = 2 << 40,
                          disk_free: int = 7 << 40) -> NodeSample:
    """One replay frame: a recording name (real nvidia-smi output), None (CPU node), 'unreachable' or 'stale'."""
    if frame in ("unreachable", "stale"):
        return NodeSample(node=node, state=NodeState.UNREACHABLE, ts=ts, error="connection lost (replayed)")
    gpus = tuple(parse_nvidia_smi_csv(RECORDINGS[frame])) if frame else ()
    busy = sum(g.mem_used for g in gpus)
    return NodeSample(node=node, state=NodeState.OK if gpus else NodeState.NO_GPU, gpus=gpus,
                      ram_used=ram_total // 8 + busy // 2, ram_total=ram_total, disk_free=disk_free, ts=ts)


class ReplayTelemetrySource:
    """Replays scripted samples, one per node per interval, through the TelemetrySource API.

    `start()` runs a timer thread; without it, `advance()` steps deterministically (tests, snapshots).
    Each replayed sample gets ts = now; UNREACHABLE frames after a good one become STALE with their age.
    """

    def __init__(self, script: dict[str, list[NodeSample]], interval_s: float = 2.0, loop: bool = True):
        self.script = {n: list(s) for n, s in script.items()}
        self.interval_s, self.loop = interval_s, loop
        self.book = SampleBook(self.script)
        self._pos = {n: 0 for n in self.script}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.advance()

    @classmethod
    def from_recordings(cls, nodes: dict[str, list[str | None]], interval_s: float = 2.0,
                        loop: bool = True) -> "ReplayTelemetrySource":
        for frames in nodes.values():
            for f in frames:
                if f not in (None, "unreachable", "stale") and f not in RECORDINGS:
                    raise KeyError(f"unknown recording {f!r}; known: {', '.join(sorted(RECORDINGS))}")
        script = {n: [sample_from_recording(n, f, 0.0) for f in frames] for n, frames in nodes.items()}
        return cls(script, interval_s=interval_s, loop=loop)

    @classmethod
    def demo(cls, interval_s: float = 2.0) -> "ReplayTelemetrySource":
        busy2, idle2 = "query_busy_2gpu.csv", "query_idle_2gpu.csv"
        return cls.from_recordings({
            "node0": [idle2, busy2, busy2, busy2, idle2, busy2],
            "node1": [busy2, busy2, idle2, busy2, busy2, idle2],
            "node2": ["query_idle_1gpu.csv", "query_busy_1gpu.csv", "query_busy_1gpu.csv",
                      "stale", "stale", "stale"],
            "cpu0": [None],
        }, interval_s=interval_s)

    def nodes(self) -> list[str]:
        return self.book.nodes()

    def advance(self, n: int = 1) -> None:
        for _ in range(n):
            now = time.time()
            for node, frames in self.script.items():
                i = self._pos[node]
                if i >= len(frames):
                    if not self.loop or not frames:
                        continue
                    i = 0
                self._pos[node] = i + 1
                self.book.record(replace(frames[i], node=node, ts=now))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.advance()

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="telemetry-replay", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def snapshot(self) -> list[NodeSample]:
        return self.book.snapshot(time.time())

    def history(self, node: str, n: int = 60) -> list[NodeSample]:
        return self.book.history(node, n)
