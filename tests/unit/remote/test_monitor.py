"""The live poller's pure parts and its threading, on recorded nvidia-smi output and this machine."""

from __future__ import annotations

import threading
import time

from remote.monitor import LocalProbe, TelemetryMonitor, sample_from_probe_output
from remote.recorded import RECORDINGS
from remote.telemetry import MIB, NodeSample, NodeState

MEMINFO = "MemTotal:       2113864120 kB\nMemFree:        1000000000 kB\nMemAvailable:   2000000000 kB\n"
DF = ("Filesystem     1024-blocks      Used Available Capacity Mounted on\n"
      "fs:/shared     9000000000 1000000000 8000000000      12% /shared\n")


def probe_output(gpu: str, rc: int) -> str:
    return f"@@qd gpu\n{gpu}@@qd rc {rc}\n@@qd mem\n{MEMINFO}@@qd df\n{DF}"


def test_gpu_node_from_recorded_output():
    s = sample_from_probe_output("n0", probe_output(RECORDINGS["query_busy_2gpu.csv"], 0), 5.0)
    assert s.state is NodeState.OK and [g.mem_used for g in s.gpus] == [7649 * MIB, 13879 * MIB]
    assert s.ram_total == 2113864120 * 1024 and s.ram_used == (2113864120 - 2000000000) * 1024
    assert s.disk_free == 8000000000 * 1024 and s.ts == 5.0 and s.error is None


def test_cpu_node_is_no_gpu_not_an_error():
    s = sample_from_probe_output("c", probe_output("sh: 1: nvidia-smi: not found\n", 127), 1.0)
    assert s.state is NodeState.NO_GPU and s.error is None and s.gpus == ()


def test_broken_driver_is_no_gpu_with_the_reason():
    msg = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n"
    s = sample_from_probe_output("g", probe_output(msg, 9), 1.0)
    assert s.state is NodeState.NO_GPU and "NVIDIA-SMI has failed" in s.error


def test_local_probe_on_this_machine():
    s = LocalProbe("here", "/tmp").sample()
    assert s.state in (NodeState.OK, NodeState.NO_GPU)
    assert 0 < s.ram_used < s.ram_total and s.disk_free > 0


class _Scripted:
    """A probe returning given samples; `block` holds it (a node hanging on a dead connection)."""

    def __init__(self, node, states, block: threading.Event | None = None):
        self.node, self.states, self.block, self.calls = node, list(states), block, 0

    def sample(self):
        if self.block is not None:
            self.block.wait(30)
        st = self.states[min(self.calls, len(self.states) - 1)]
        self.calls += 1
        return NodeSample(node=self.node, state=st, ts=time.time(), error=None if st is NodeState.NO_GPU else "down")


def test_a_hung_node_never_delays_the_others():
    hang = threading.Event()
    mon = TelemetryMonitor({"fast": _Scripted("fast", [NodeState.NO_GPU]),
                            "hung": _Scripted("hung", [NodeState.NO_GPU], block=hang)},
                           interval_s=0.05, stale_after=0.5)
    mon.start()
    try:
        time.sleep(0.6)
        fast, hung = mon.snapshot()
        assert fast.state is NodeState.NO_GPU and len(mon.history("fast")) >= 5
        assert hung.state is NodeState.UNREACHABLE  # never answered yet
    finally:
        hang.set()
        mon.stop()


def test_failure_after_good_is_stale_with_age():
    mon = TelemetryMonitor({"a": _Scripted("a", [NodeState.NO_GPU, NodeState.UNREACHABLE])}, interval_s=1)
    good = mon.poll_once("a")
    time.sleep(0.05)
    bad = mon.poll_once("a")
    assert good.state is NodeState.NO_GPU
    assert bad.state is NodeState.STALE and bad.age >= 0.05 and bad.error == "down" and bad.ram_total is None
