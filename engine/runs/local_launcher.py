"""The local launcher: starts a stage worker on this machine, detached in its own session.

The worker gets stdin from /dev/null and writes stdout+stderr to the stage's log.txt, so it survives
the terminal, the console and a Ctrl-C in the follower. Multi-rank stages on this machine go through
`python -m torch.distributed.run --standalone --nproc-per-node N` (gloo on CPUs).

A single-process worker can be started ahead (`prepare`) as a standby: `--standby LOG` makes it import its stage
and wait for a `go` line on its stdin, a pipe from the driver, before it touches the run dir; until then its
output goes to an unlinked spool file, copied into LOG at the go. End of file on that pipe (the driver ended it,
or died) makes it exit untouched. `start` hands the go to a live standby of the same spec, else launches afresh.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from engine.core.errors import RunError
from engine.core.locks import pid_alive
from engine.runs.launcher import Launcher, WorkerHandle, WorkerSpec

REPO_ROOT = Path(__file__).resolve().parents[1]


def worker_command(spec: WorkerSpec, python: str = sys.executable) -> list[str]:
    """argv of a worker: `python -m engine.runs.worker STAGE --run-dir D [args]` (under torchrun for N ranks)."""
    tail = ["-m", "engine.runs.worker", spec.stage, "--run-dir", spec.run_dir, *spec.args]
    if spec.nproc_per_node > 1 and spec.nnodes <= 1:
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={spec.nproc_per_node}",
                *tail]
    return [python, *tail]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    pp = env.get("PYTHONPATH", "")
    if str(REPO_ROOT) not in pp.split(os.pathsep):
        env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + pp if pp else "")
    env.update(extra or {})
    return env


class LocalLauncher(Launcher):
    """Runs workers as detached local processes. `exit_code(pid)` gives the code of one it started
    (negative: killed by that signal), which the runner hands to the root-cause classifier."""

    name = "local"

    def __init__(self, python: str = sys.executable):
        self.python = python
        self._procs: dict[int, subprocess.Popen] = {}
        self._standby: dict[tuple[str, str], tuple[WorkerSpec, subprocess.Popen]] = {}

    def prepare(self, spec: WorkerSpec) -> WorkerHandle | None:
        if spec.nnodes > 1 or spec.nproc_per_node > 1 or (spec.run_dir, spec.stage) in self._standby:
            return None
        try:
            with tempfile.TemporaryFile() as spool:
                proc = subprocess.Popen([*worker_command(spec, self.python), "--standby", str(_log_path(spec))],
                                        stdin=subprocess.PIPE, stdout=spool, stderr=subprocess.STDOUT,
                                        start_new_session=True, close_fds=True, env=child_env(spec.env),
                                        cwd=str(REPO_ROOT))
        except OSError:  # only a head start: start launches afresh
            return None
        self._standby[(spec.run_dir, spec.stage)] = (spec, proc)
        return WorkerHandle(host="local", pid=proc.pid)

    def start(self, spec: WorkerSpec) -> WorkerHandle:
        if spec.nnodes > 1:
            raise RunError(f"stage {spec.stage} spans {spec.nnodes} nodes; the local launcher runs one machine",
                           at=spec.stage, hint="use the SSH/torchrun launcher (a [cluster] in the recipe)")
        held, proc = self._standby.pop((spec.run_dir, spec.stage), (None, None))
        if proc is not None and (held != spec or not _go(proc)):
            _drop(proc)
            proc = None
        if proc is None:
            log = _log_path(spec)
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "ab") as out, open(os.devnull, "rb") as devnull:
                proc = subprocess.Popen(worker_command(spec, self.python), stdin=devnull, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                                        env=child_env(spec.env), cwd=str(REPO_ROOT))
        self._procs[proc.pid] = proc
        return WorkerHandle(host="local", pid=proc.pid)

    def exit_code(self, pid: int) -> int | None:
        proc = self._procs.get(pid)
        return proc.poll() if proc is not None else None

    def is_alive(self, host: str, pid: int) -> bool:
        proc = self._procs.get(pid)
        if proc is not None:
            return proc.poll() is None
        return pid_alive(pid)

    def terminate(self, host: str, pid: int, sig: int = signal.SIGTERM) -> None:
        try:
            os.killpg(os.getpgid(pid), sig)
        except ProcessLookupError:
            return
        except PermissionError as e:
            raise RunError(f"not allowed to signal pid {pid}", at=str(pid)) from e

    def read_bytes(self, path: str, offset: int = 0) -> bytes:
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                return fh.read()
        except FileNotFoundError:
            return b""

    def close(self) -> None:
        for _, proc in self._standby.values():
            _drop(proc)
        self._standby.clear()
        for proc in self._procs.values():
            proc.poll()


def _log_path(spec: WorkerSpec) -> Path:
    return Path(spec.log_path) if spec.log_path else Path(spec.run_dir) / "stages" / spec.stage / "log.txt"


def _go(proc: subprocess.Popen) -> bool:
    """Hand a standby its go; False when it is gone already (start then launches afresh)."""
    if proc.poll() is not None or proc.stdin is None:
        return False
    try:
        proc.stdin.write(b"go\n")
        proc.stdin.close()
    except OSError:  # it ended between the poll and the write
        return False
    return True


def _drop(proc: subprocess.Popen) -> None:
    """End a standby that will not get its go: it has touched nothing of the run, so a kill is all it takes."""
    try:
        if proc.stdin is not None:
            proc.stdin.close()
    except OSError:
        pass
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def local_launcher_for(recipe: object = None, run_dir: object = None) -> LocalLauncher:
    """The launcher factory for runs on this machine (see engine.runs.runner)."""
    return LocalLauncher()
