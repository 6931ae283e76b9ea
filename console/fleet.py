"""Fleet feeds: where the dashboard's node × GPU view comes from, as NodeView tuples.

- `TelemetryFleet` adapts any remote.telemetry TelemetrySource (live monitor, or the replay of real recorded
  nvidia-smi output) — its snapshot never blocks, so a dead node shows up stale/unreachable, never as a delay.
- `LocalFleet`: this machine alone (nvidia-smi with a 2 s timeout when present, else "no GPU"; RAM; disk).
- `replay_fleet_4x8`: four nodes replayed from the real recordings, one stale and one without GPUs (or, with
  `cpu_node=False`, four 8-GPU nodes: 32 GPUs) (snapshots, benchmark, `QUANTDECK_FLEET=replay`): a GPU cannot
  exist on a CPU machine; its output can.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from dataclasses import replace
from typing import Callable, Protocol

from console.models import HOST_CONNECTING, HOST_NO_GPU, HOST_OK, HOST_STALE, HOST_UNREACHABLE, GpuView, NodeView

_MIB = 1024 * 1024
_STATE = {"ok": HOST_OK, "no-gpu": HOST_NO_GPU, "stale": HOST_STALE, "unreachable": HOST_UNREACHABLE}


class FleetFeed(Protocol):
    interval_s: float

    def poll(self) -> tuple[NodeView, ...]: ...

    def close(self) -> None: ...


def node_view(sample, host: str = "") -> NodeView:
    """remote.telemetry.NodeSample → NodeView (sizes to MiB for GPUs; STALE keeps its last good time)."""
    gpus = tuple(GpuView(index=g.index, name=g.name, mem_used_mib=g.mem_used / _MIB, mem_total_mib=g.mem_total / _MIB,
                         util_pct=g.util, temp_c=g.temp) for g in sample.gpus)
    state = _STATE.get(str(getattr(sample.state, "value", sample.state)), HOST_UNREACHABLE)
    if state == HOST_UNREACHABLE and (sample.error or "") == "no sample yet":
        state = HOST_CONNECTING
    return NodeView(name=sample.node, host=host or sample.node, state=state,
                    sampled_at=sample.ts if state != HOST_UNREACHABLE else None, gpus=gpus,
                    ram_used=sample.ram_used or 0, ram_total=sample.ram_total or 0,
                    disk_free=sample.disk_free or 0, disk_total=0, error=sample.error or "")


class TelemetryFleet:
    def __init__(self, source, interval_s: float = 1.0, start: bool = True):
        self.source, self.interval_s = source, interval_s
        if start:
            source.start()

    def poll(self) -> tuple[NodeView, ...]:
        return tuple(node_view(s) for s in self.source.snapshot())

    def close(self) -> None:
        self.source.stop()


class LazyFleet:
    """A feed built on its first poll, in the console's telemetry worker: what it takes to set up (the
    recipe's cluster, SSH, the remote telemetry modules) stays off the console's start and its event loop."""

    def __init__(self, make: Callable[[], FleetFeed], interval_s: float = 1.0):
        self._make, self.interval_s = make, interval_s
        self._feed: FleetFeed | None = None
        self._lock = threading.Lock()
        self._closed = False

    def poll(self) -> tuple[NodeView, ...]:
        if self._feed is None:
            feed = self._make()
            with self._lock:
                self._feed, closed = feed, self._closed
            if closed:  # the console quit while the feed was being built
                feed.close()
                return ()
            self.interval_s = feed.interval_s
        return self._feed.poll()

    def close(self) -> None:
        with self._lock:
            self._closed, feed = True, self._feed
        if feed is not None:
            feed.close()


class LocalFleet:
    """This machine: GPUs from nvidia-smi when present (2 s timeout), host RAM and the work dir's free disk."""

    def __init__(self, workdir: str = ".", name: str = "local", interval_s: float = 2.0,
                 clock: Callable[[], float] = time.time):
        self.workdir, self.name, self.interval_s, self.clock = workdir, name, interval_s, clock
        self._smi = shutil.which("nvidia-smi")

    def poll(self) -> tuple[NodeView, ...]:
        from remote.telemetry import NodeSample, NodeState, parse_nvidia_smi_csv

        gpus = ()
        if self._smi:
            try:
                out = subprocess.run([self._smi, "--query-gpu=index,name,uuid,memory.used,memory.total,"
                                      "utilization.gpu,temperature.gpu,power.draw", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=2.0)
                gpus = tuple(parse_nvidia_smi_csv(out.stdout)) if out.returncode == 0 else ()
            except (OSError, subprocess.TimeoutExpired):
                gpus = ()
        ram_used = ram_total = None
        try:
            import psutil

            vm = psutil.virtual_memory()
            ram_used, ram_total = vm.total - vm.available, vm.total
        except Exception:  # noqa: BLE001 - no psutil / no /proc: dashes
            pass
        try:
            disk_free = shutil.disk_usage(self.workdir).free
        except OSError:
            disk_free = None
        s = NodeSample(node=self.name, state=NodeState.OK if gpus else NodeState.NO_GPU, gpus=gpus,
                       ram_used=ram_used, ram_total=ram_total, disk_free=disk_free, ts=self.clock())
        return (node_view(s, host="localhost"),)

    def close(self) -> None:
        return None


def script_4x8(gpus: int = 8, cpu_node: bool = True) -> dict:
    """Per node a list of NodeSample frames from the real recordings, each widened to `gpus` GPUs; node3 has no
    GPU (`cpu_node`) or `gpus` H100s."""
    from remote.recorded import RECORDINGS
    from remote.telemetry import NodeSample, NodeState, parse_nvidia_smi_csv

    def widen(name: str, shift: int) -> tuple:
        rec = parse_nvidia_smi_csv(RECORDINGS[name])
        out = []
        for k in range(gpus):
            g = rec[k % len(rec)]
            extra = ((k * 7 + shift * 3) % 11) / 100.0 * g.mem_total if g.mem_used else 0
            out.append(replace(g, index=k, mem_used=int(min(g.mem_total, g.mem_used + extra))))
        return tuple(out)

    def frames(names: list[str]) -> list:
        return [NodeSample(node="", state=NodeState.OK, gpus=widen(n, i), ram_used=(600 + 40 * (i % 4)) << 30,
                           ram_total=2 << 40, disk_free=(12 + i % 2) << 40) for i, n in enumerate(names)]

    busy2, idle2, busy1 = "query_busy_2gpu.csv", "query_idle_2gpu.csv", "query_busy_1gpu.csv"
    cpu = [NodeSample(node="node3", state=NodeState.NO_GPU, ram_used=80 << 30, ram_total=512 << 30,
                      disk_free=3 << 40)]
    return {
        "node0": frames([busy2, busy2, idle2, busy2, busy2, busy2]),
        "node1": frames([busy1, busy1, busy1, busy2]),
        "node2": [NodeSample(node="node2", state=NodeState.UNREACHABLE, error="no answer (replayed)")],
        "node3": cpu if cpu_node else frames([busy1, busy1, "query_idle_1gpu.csv", busy1, busy1]),
    }


def replay_fleet_4x8(clock: Callable[[], float] = time.time, interval_s: float = 1.0, start: bool = True,
                     stale_for_s: float = 47.0, cpu_node: bool = True) -> TelemetryFleet:
    """4 nodes × 8 GPUs replayed at `interval_s`: node2 went stale `stale_for_s` ago, node3 has no GPU
    (`cpu_node`, the default) or 8 like the others."""
    from remote.telemetry import ReplayTelemetrySource

    script = script_4x8(cpu_node=cpu_node)
    src = ReplayTelemetrySource(script, interval_s=interval_s, loop=True)
    good = script["node0"][0]
    src.book.record(replace(good, node="node2", ts=clock() - stale_for_s))  # its last good sample
    src.advance()  # node2's newest poll fails: stale, with the age of that sample
    return TelemetryFleet(src, interval_s=interval_s, start=start)
