"""Live telemetry: one polling thread per node, so a slow or dead node never delays the others.

A probe takes one sample of one node: `LocalProbe` reads NVML (nvidia-ml-py), psutil and statvfs on this
machine; `SSHProbe` runs one small script over the node's shared connection (nvidia-smi --query-gpu,
/proc/meminfo, df -P of the work dir). `TelemetryMonitor` implements remote.telemetry.TelemetrySource.
"""

from __future__ import annotations

import shlex
import threading
import time
from typing import Callable, Mapping, Protocol

from engine.core.errors import QuantdeckError
from engine.core.meminfo import parse_meminfo
from remote.telemetry import (
    NVIDIA_SMI_QUERY,
    GpuSample,
    NodeSample,
    NodeState,
    SampleBook,
    parse_df_free,
    parse_nvidia_smi_csv,
    split_sections,
)

DEFAULT_INTERVAL = 2.0
# nvidia-smi from PATH, else where drivers put it outside a login shell's PATH; rc 127 when there is none
PROBE_SCRIPT = (
    'echo "@@qd gpu"; smi=$(command -v nvidia-smi || ls /usr/local/nvidia/bin/nvidia-smi /usr/lib/wsl/lib/nvidia-smi '
    '2>/dev/null | head -n 1); if [ -n "$smi" ]; then "$smi" ' + shlex.join(NVIDIA_SMI_QUERY[1:]) +
    ' 2>&1; echo "@@qd rc $?"; else echo "nvidia-smi: not found"; echo "@@qd rc 127"; fi; '
    'echo "@@qd mem"; cat /proc/meminfo; '
    'echo "@@qd df"; d="$1"; while [ ! -e "$d" ] && [ "$d" != / ]; do d=$(dirname "$d"); done; df -P -k "$d" 2>&1'
)


class Probe(Protocol):
    node: str

    def sample(self) -> NodeSample: ...


def sample_from_probe_output(node: str, text: str, ts: float) -> NodeSample:
    """Build a node's sample from the output of PROBE_SCRIPT (pure; tested on recordings)."""
    sec = split_sections(text)
    gpus = tuple(parse_nvidia_smi_csv(sec.get("gpu", "")))
    rc_key = next((k for k in sec if k.startswith("rc ")), "rc 0")
    rc = int(rc_key.split()[1]) if rc_key.split()[1].isdigit() else -1
    mem = parse_meminfo(sec.get("mem", ""))
    error = None
    if not gpus and rc not in (0, 127):  # nvidia-smi exists but failed (driver gone): say so, still "no GPU"
        error = "nvidia-smi: " + (sec.get("gpu", "").strip().splitlines() or ["exit %d" % rc])[0][:200]
    return NodeSample(node=node, state=NodeState.OK if gpus else NodeState.NO_GPU, gpus=gpus,
                      ram_used=mem[0] if mem else None, ram_total=mem[1] if mem else None,
                      disk_free=parse_df_free(sec.get("df", "")), ts=ts, error=error)


class SSHProbe:
    """Samples a node over its shared SSHConnection; a failure becomes an UNREACHABLE sample, never a raise."""

    def __init__(self, node: str, conn, work_dir: str | None = None, timeout: float = 10.0,
                 env: Mapping[str, str] | None = None):
        self.node, self.conn, self.work_dir, self.timeout = node, conn, work_dir or "/", timeout
        self.env = {k: v for k, v in (env or {}).items() if k in ("PATH", "LD_LIBRARY_PATH")}

    def sample(self) -> NodeSample:
        try:
            res = self.conn.run(["sh", "-c", PROBE_SCRIPT, "qd", self.work_dir], env=self.env, timeout=self.timeout)
        except QuantdeckError as e:
            return NodeSample(node=self.node, state=NodeState.UNREACHABLE, ts=time.time(), error=e.msg)
        if "@@qd df" not in res.stdout:
            return NodeSample(node=self.node, state=NodeState.UNREACHABLE, ts=time.time(),
                              error=f"incomplete answer (exit {res.rc}): {res.stderr.strip()[-200:]}")
        return sample_from_probe_output(self.node, res.stdout, time.time())


class LocalProbe:
    """Samples this machine: NVML for GPUs (none, or no driver: "no GPU"), psutil RAM, free disk of work_dir."""

    def __init__(self, node: str = "local", work_dir: str | None = None):
        self.node, self.work_dir = node, work_dir or "/"
        self._nvml: bool | None = None

    def _gpus(self) -> tuple[GpuSample, ...]:
        try:
            import pynvml
        except ImportError:
            return ()
        if self._nvml is None:
            try:
                pynvml.nvmlInit()
                self._nvml = True
            except pynvml.NVMLError:
                self._nvml = False
        if not self._nvml:
            return ()

        def opt(fn, handle, *a):
            """A reading the GPU may not support (None then)."""
            try:
                return float(fn(handle, *a))
            except pynvml.NVMLError:
                return None

        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            util = None
            try:
                util = float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
            except pynvml.NVMLError:
                pass
            power = opt(pynvml.nvmlDeviceGetPowerUsage, h)
            name = pynvml.nvmlDeviceGetName(h)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            out.append(GpuSample(index=i, name=name.decode() if isinstance(name, bytes) else name,
                                 uuid=uuid.decode() if isinstance(uuid, bytes) else uuid,
                                 mem_used=int(mem.used), mem_total=int(mem.total), util=util,
                                 temp=opt(pynvml.nvmlDeviceGetTemperature, h, pynvml.NVML_TEMPERATURE_GPU),
                                 power=power / 1000.0 if power is not None else None))
        return tuple(out)

    def sample(self) -> NodeSample:
        import psutil

        from engine.core.fsutil import free_bytes

        vm = psutil.virtual_memory()
        gpus = self._gpus()
        return NodeSample(node=self.node, state=NodeState.OK if gpus else NodeState.NO_GPU, gpus=gpus,
                          ram_used=int(vm.total - vm.available), ram_total=int(vm.total),
                          disk_free=free_bytes(self.work_dir), ts=time.time())


class TelemetryMonitor:
    """Polls every probe in its own thread every `interval_s`; snapshot() never blocks on a node.

    A node whose newest answer is older than `stale_after` (a hung poll) shows as stale too.
    """

    def __init__(self, probes, interval_s: float = DEFAULT_INTERVAL,
                 stale_after: float | None = None, on_sample: Callable[[NodeSample], None] | None = None):
        """`probes`: node name → Probe; or a cluster (recipe [cluster] section, dict, ClusterSpec) to poll over SSH."""
        self.pool = None
        if not (isinstance(probes, Mapping) and all(hasattr(p, "sample") for p in probes.values())):
            probes, self.pool = _cluster_probes(probes)
        self.probes = dict(probes)
        self.interval_s = interval_s
        self.stale_after = stale_after if stale_after is not None else max(3 * interval_s, 5.0)
        self.book = SampleBook(self.probes)
        self.on_sample = on_sample
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @classmethod
    def for_cluster(cls, cluster, pool=None, **kw) -> "TelemetryMonitor":
        """SSH probes for a cluster's nodes ('local' hosts are read in-process) over `pool`'s connections."""
        probes, pool = _cluster_probes(cluster, pool)
        mon = cls(probes, **kw)
        mon.pool = pool
        return mon

    @classmethod
    def local(cls, work_dir: str | None = None, **kw) -> "TelemetryMonitor":
        return cls({"local": LocalProbe("local", work_dir)}, **kw)

    def nodes(self) -> list[str]:
        return self.book.nodes()

    def poll_once(self, node: str) -> NodeSample:
        try:
            s = self.probes[node].sample()
        except Exception as e:  # noqa: BLE001 - a probe bug must not kill the node's thread
            s = NodeSample(node=node, state=NodeState.UNREACHABLE, ts=time.time(), error=f"{type(e).__name__}: {e}")
        s = self.book.record(s)
        if self.on_sample is not None:
            self.on_sample(s)
        return s

    def _loop(self, node: str) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            self.poll_once(node)
            self._stop.wait(max(0.05, self.interval_s - (time.monotonic() - t0)))

    def start(self) -> None:
        if any(t.is_alive() for t in self._threads):
            return
        self._stop.clear()
        self._threads = [threading.Thread(target=self._loop, args=(n,), name=f"telemetry-{n}", daemon=True)
                         for n in self.probes]
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=timeout)
        self._threads = []

    def snapshot(self) -> list[NodeSample]:
        now = time.time()
        out = []
        for s in self.book.snapshot(now):
            if s.fresh and now - s.ts > self.stale_after:
                s = NodeSample(**{**s.__dict__, "state": NodeState.STALE, "age": now - s.ts,
                                  "error": f"no answer for {now - s.ts:.0f}s"})
            out.append(s)
        return out

    def history(self, node: str, n: int = 60) -> list[NodeSample]:
        return self.book.history(node, n)

    def close(self) -> None:
        self.stop()
        if self.pool is not None:
            self.pool.close()


def _cluster_probes(cluster, pool=None):
    from remote.hosts import cluster_from
    from remote.ssh import ConnectionPool

    cluster = cluster_from(cluster)
    pool = pool or ConnectionPool.for_cluster(cluster)
    probes: dict[str, Probe] = {}
    for n in cluster.nodes:
        if n.host == "local":
            probes[n.name] = LocalProbe(n.name, cluster.work_dir)
        else:
            probes[n.name] = SSHProbe(n.name, pool.get(n.name), cluster.work_dir,
                                      timeout=max(cluster.connect_timeout, 5.0), env=cluster.env)
    return probes, pool
