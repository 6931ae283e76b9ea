"""The Launcher ABC: how the runner starts and follows a detached stage worker, wherever it runs.

engine ships the local launcher; remote/ implements the SSH and torchrun ones. The runner only ever
talks to this interface, so a stage runs the same on this machine or on a node four hops away.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field


@dataclass(frozen=True)
class WorkerSpec:
    """What to start: `python -m engine.runs.worker STAGE --run-dir RUN_DIR [args]` on `node` (None: head/local)."""

    run_dir: str
    stage: str
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    node: str | None = None
    nnodes: int = 1  # >1: a torchrun spanning nodes (multi-node stages)
    nproc_per_node: int = 1
    log_path: str | None = None  # where stdout/stderr of the detached process go


@dataclass(frozen=True)
class WorkerHandle:
    host: str  # the node name ("local" for this machine)
    pid: int  # pid of the detached session leader (its process group id too)
    node_pids: dict[str, int] = field(default_factory=dict)  # multi-node: node → pid


class Launcher(abc.ABC):
    """Starts detached workers and reads run-dir files where they run.

    Methods raise `engine.core.errors.RemoteError` (host unreachable, lost connection) or `RunError`.
    """

    name: str = "launcher"

    @abc.abstractmethod
    def start(self, spec: WorkerSpec) -> WorkerHandle:
        """Start the worker detached (its own session, stdin closed, output to spec.log_path); return at once."""

    def prepare(self, spec: WorkerSpec) -> WorkerHandle | None:
        """Start the worker of `spec` ahead, idle until `start(spec)` hands it the go (and returns this same handle),
        so its start-up overlaps the stage running now. It touches nothing of the run before its go; one never
        started ends with `close`, or with the driver. None where none is started (the default: start launches
        afresh)."""
        return None

    @abc.abstractmethod
    def is_alive(self, host: str, pid: int) -> bool:
        """Whether process `pid` still runs on `host`."""

    @abc.abstractmethod
    def terminate(self, host: str, pid: int, sig: int = 15) -> None:
        """Send `sig` to the process group of `pid` on `host`."""

    @abc.abstractmethod
    def read_bytes(self, path: str, offset: int = 0) -> bytes:
        """Bytes of `path` from `offset` (b"" when missing), as the worker's host sees the run dir."""

    def close(self) -> None:  # pragma: no cover - default no-op
        return None
