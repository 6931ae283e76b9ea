"""The SSH and torchrun launchers: engine.runs.launcher.Launcher over each node's one SSH connection.

A worker is started detached on its node — its own session (`setsid`), immune to hangups (`nohup`),
stdin closed, output appended to its log — and the start command returns its pid at once. The worker
outlives the SSH connection; the runner follows it by reading the run dir (shared FS) over SFTP, and
after a reconnect picks up where it left off. When the worker exits, its exit status is written next to
its log (`<log>.exit`), so a crash is told apart from a clean end even without status.json.

Multi-node stages start `python -m torch.distributed.run --nnodes N --node_rank r --master_addr HEAD
--master_port P --nproc-per-node G -m engine.runs.worker …` on every node; the port is picked free on the
head. A node that fails to start (or dies while joining) is named, and the others are stopped.
"""

from __future__ import annotations

import shlex
import time
from pathlib import PurePosixPath
from typing import Sequence

from engine.core.errors import QuantdeckError, RemoteError, RunError
from engine.runs.launcher import Launcher, WorkerHandle, WorkerSpec
from remote.hosts import ClusterSpec, cluster_from, resolve_cluster
from remote.ssh import ConnectionPool, SSHConnection

# $1 = log file, $2 = exit-status file, rest = argv. Prints the pid of the detached session leader.
DETACH = ('log=$1; rc=$2; shift 2; mkdir -p "$(dirname "$log")"; rm -f "$rc"; '
          'setsid nohup sh -c \'"$@"; echo $? > "$0"\' "$rc" "$@" </dev/null >>"$log" 2>&1 & echo $!')
# exit 0 when pid $1 runs and is not a zombie
ALIVE = ('s=$(cat /proc/"$1"/stat 2>/dev/null) || exit 1; '
         'case "${s##*) }" in Z*|X*) exit 1;; esac; exit 0')
# $1 signal, $2 pid: signal pid's process group (never group 0/1), else pid alone
KILL_GROUP = ('sig=$1; pid=$2; s=$(cat /proc/"$pid"/stat 2>/dev/null) || exit 0; set -- ${s##*) }; pg=$3; '
              'if [ "$pg" -gt 1 ] 2>/dev/null; then kill -"$sig" -"$pg" 2>/dev/null && exit 0; fi; kill -"$sig" "$pid"')
FREE_PORT = "import socket; s=socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])"


def worker_argv(python: str, module: str, spec: WorkerSpec) -> list[str]:
    return [python, "-m", module, spec.stage, "--run-dir", spec.run_dir, *spec.args]


def torchrun_argv(python: str, module: str, spec: WorkerSpec, *, nnodes: int, node_rank: int,
                  master_addr: str, master_port: int, nproc_per_node: int) -> list[str]:
    return [python, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node_rank", str(node_rank),
            "--master_addr", master_addr, "--master_port", str(master_port),
            "--nproc-per-node", str(nproc_per_node),
            "-m", module, spec.stage, "--run-dir", spec.run_dir, *spec.args]


def stage_is_distributed(stage: str) -> bool:
    """Whether the registered stage runs under torchrun (engine.stages.base.Stage.distributed)."""
    try:
        from engine.runs.worker import load_stage_class

        return bool(getattr(load_stage_class(stage), "distributed", False))
    except Exception:  # noqa: BLE001 - an unknown stage (a test module) is a single process
        return False


def default_log(spec: WorkerSpec) -> str:
    return spec.log_path or str(PurePosixPath(spec.run_dir) / "stages" / spec.stage / "log.txt")


def node_log(log: str, node: str) -> str:
    """Per-node log of a multi-node stage: log.txt → log.node1.txt."""
    p = PurePosixPath(log)
    return str(p.with_name(f"{p.stem}.{node}{p.suffix}"))


class SSHLauncher(Launcher):
    """Starts `python -m engine.runs.worker STAGE --run-dir D …` detached on a node over SSH."""

    name = "ssh"

    def __init__(self, cluster, pool: ConnectionPool | None = None, *, module: str = "engine.runs.worker",
                 join_check_s: float = 2.0, unreachable_grace_s: float = 300.0):
        self.cluster: ClusterSpec = cluster_from(cluster)
        self.pool = pool or ConnectionPool.for_cluster(self.cluster)
        self.module = module
        self.join_check_s = join_check_s
        self.unreachable_grace_s = unreachable_grace_s
        self._exit_files: dict[tuple[str, int], str] = {}
        self._unreachable_since: dict[str, float] = {}

    # ------------------------------------------------------------------ helpers
    def conn(self, node: str | None) -> SSHConnection:
        return self.pool.get(node or self.cluster.head_name)

    def _launch(self, node: str, argv: Sequence[str], env: dict[str, str], log: str) -> int:
        exit_file = log + ".exit"
        full_env = {**dict(self.cluster.env), "QUANTDECK_NODE": node, **env}
        res = self.conn(node).run(["sh", "-c", DETACH, "qd", log, exit_file, *argv], env=full_env,
                                  cwd=self.cluster.cwd, timeout=max(self.cluster.connect_timeout, 30.0))
        pid_text = res.stdout.strip().splitlines()[-1:] or [""]
        if res.rc != 0 or not pid_text[0].isdigit():
            raise RunError(f"{node}: could not start `{shlex.join(argv)[:200]}` (exit {res.rc}): "
                           f"{res.stderr.strip()[-300:]}", at=node, hint=f"see {log} on {node}")
        pid = int(pid_text[0])
        self._exit_files[(node, pid)] = exit_file
        return pid

    # ------------------------------------------------------------------ Launcher
    def start(self, spec: WorkerSpec) -> WorkerHandle:
        if spec.nnodes > 1:
            return self.start_multi(spec)
        node = spec.node or self.cluster.head_name
        gpus = self.cluster.node(node).gpus  # unknown node → RecipeError listing the known ones
        nproc = spec.nproc_per_node if spec.nproc_per_node > 1 else gpus
        if nproc > 1 and (spec.nproc_per_node > 1 or stage_is_distributed(spec.stage)):
            # a distributed stage on one multi-GPU node: one rank per GPU through torchrun
            argv = torchrun_argv(self.cluster.python, self.module, spec, nnodes=1, node_rank=0,
                                 master_addr="127.0.0.1", master_port=self.free_port(node), nproc_per_node=nproc)
        else:
            argv = worker_argv(self.cluster.python, self.module, spec)
        pid = self._launch(node, argv, dict(spec.env), default_log(spec))
        return WorkerHandle(host=node, pid=pid, node_pids={node: pid})

    def check_alive(self, host: str, pid: int) -> bool:
        """Whether `pid` runs on `host`, asked now; raises RemoteError when the node does not answer."""
        return self.conn(host).run(["sh", "-c", ALIVE, "qd", str(int(pid))], timeout=30).rc == 0

    def is_alive(self, host: str, pid: int) -> bool:
        """Like check_alive, but a node that is merely unreachable counts as alive for `unreachable_grace_s`:
        a lost SSH connection never kills a run (the worker goes on; status.json stays the truth)."""
        try:
            alive = self.check_alive(host, pid)
        except RemoteError as e:
            since = self._unreachable_since.setdefault(host, time.monotonic())
            if time.monotonic() - since < self.unreachable_grace_s:
                return True
            raise RemoteError(f"{host} unreachable for {time.monotonic() - since:.0f}s; worker {pid} state unknown",
                              at=host, hint="check the node; the worker may still be running there") from e
        self._unreachable_since.pop(host, None)
        return alive

    def terminate(self, host: str, pid: int, sig: int = 15) -> None:
        """Signal the process group of `pid` (the worker's session: its wrapper shell, torchrun and ranks),
        whether `pid` is the session leader we started or the worker pid status.json records."""
        self.conn(host).run(["sh", "-c", KILL_GROUP, "qd", str(int(sig)), str(int(pid))], timeout=30)

    def terminate_handle(self, handle: WorkerHandle, sig: int = 15) -> list[str]:
        """Signal every node's process of a (multi-node) worker; returns the nodes that could not be reached."""
        missed = []
        for node, pid in (handle.node_pids or {handle.host: handle.pid}).items():
            try:
                self.terminate(node, pid, sig)
            except QuantdeckError:
                missed.append(node)
        return missed

    def exit_status(self, host: str, pid: int) -> int | None:
        """The worker's exit status as its shell saw it (128+N: killed by signal N); None while it runs."""
        path = self._exit_files.get((host, pid))
        if path is None:
            return None
        raw = self.conn(host).read_bytes(path).strip()
        return int(raw) if raw.lstrip(b"-").isdigit() else None

    def exit_code(self, pid: int) -> int | None:
        """As LocalLauncher.exit_code: the code of a worker this launcher started, negative = killed by signal."""
        for (host, p) in self._exit_files:
            if p == pid:
                try:
                    rc = self.exit_status(host, pid)
                except QuantdeckError:
                    return None
                if rc is not None and rc > 128:
                    return -(rc - 128)
                return rc
        return None

    def read_bytes(self, path: str, offset: int = 0) -> bytes:
        """Read through the head's connection; the work dir is shared, so any node will do when it is down."""
        order = [self.cluster.head_name] + [n.name for n in self.cluster.nodes if n.name != self.cluster.head_name]
        last: RemoteError | None = None
        for node in order:
            try:
                return self.conn(node).read_bytes(path, offset)
            except RemoteError as e:
                last = e
        assert last is not None
        raise last

    def close(self) -> None:
        self.pool.close()

    # ------------------------------------------------------------------ multi-node
    def master_addr(self) -> str:
        return self.cluster.master_addr or resolve_cluster(self.cluster)[self.cluster.head_name].hostname

    def free_port(self, node: str) -> int:
        res = self.conn(node).run([self.cluster.python, "-c", FREE_PORT], timeout=30, check=True)
        return int(res.stdout.strip())

    def start_multi(self, spec: WorkerSpec) -> WorkerHandle:
        """torchrun on the first `spec.nnodes` nodes (head first = node_rank 0); all start or none stays."""
        head = self.cluster.head_name
        names = [head] + [n.name for n in self.cluster.nodes if n.name != head]
        if spec.nnodes > len(names):
            raise RunError(f"stage {spec.stage} wants {spec.nnodes} nodes; the cluster has {len(names)}",
                           at="cluster.nodes", hint="add nodes or lower the stage's node count")
        names = names[: spec.nnodes]
        port = self.free_port(head)
        addr = self.master_addr()
        log = default_log(spec)
        started: dict[str, int] = {}
        failed: tuple[str, str] | None = None
        for rank, node in enumerate(names):
            nproc = spec.nproc_per_node if spec.nproc_per_node > 1 else max(self.cluster.node(node).gpus, 1)
            argv = torchrun_argv(self.cluster.python, self.module, spec, nnodes=len(names), node_rank=rank,
                                 master_addr=addr, master_port=port, nproc_per_node=nproc)
            try:
                started[node] = self._launch(node, argv, dict(spec.env), log if rank == 0 else node_log(log, node))
            except QuantdeckError as e:
                failed = (node, e.msg)
                break
        if failed is None:
            failed = self._check_joined(started, log)
        if failed is not None:
            node, why = failed
            for n, pid in started.items():
                try:
                    self.terminate(n, pid, 15)
                except QuantdeckError:
                    pass
            raise RemoteError(f"stage {spec.stage}: node {node} failed to start its torchrun: {why}", at=node,
                              hint=f"the other nodes ({', '.join(n for n in started if n != node) or 'none'}) "
                                   f"were stopped; fix {node} and resume")
        return WorkerHandle(host=head, pid=started[head], node_pids=started)

    def _check_joined(self, started: dict[str, int], log: str) -> tuple[str, str] | None:
        """Watch the fresh processes for join_check_s: one that already exited non-zero failed to join."""
        deadline = time.monotonic() + self.join_check_s
        while True:
            for node, pid in started.items():
                try:
                    if self.is_alive(node, pid):  # a node merely unreachable for a moment has not failed
                        continue
                    rc = self.exit_status(node, pid)
                except QuantdeckError as e:
                    return node, e.msg
                if rc not in (0, None):
                    path = log if node == next(iter(started)) else node_log(log, node)
                    tail = self.conn(node).read_bytes(path)[-400:].decode(errors="replace").strip()
                    return node, f"exited {rc}: {tail}"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.2)


class TorchrunLauncher(SSHLauncher):
    """Every stage through torchrun (even on one node: one rank per GPU, at least one); multi-node as start_multi."""

    name = "torchrun"

    def start(self, spec: WorkerSpec) -> WorkerHandle:
        if spec.nnodes > 1:
            return self.start_multi(spec)
        node = spec.node or self.cluster.head_name
        nproc = spec.nproc_per_node if spec.nproc_per_node > 1 else max(self.cluster.node(node).gpus, 1)
        argv = torchrun_argv(self.cluster.python, self.module, spec, nnodes=1, node_rank=0,
                             master_addr="127.0.0.1", master_port=self.free_port(node), nproc_per_node=nproc)
        pid = self._launch(node, argv, dict(spec.env), default_log(spec))
        return WorkerHandle(host=node, pid=pid, node_pids={node: pid})


def launcher_for(recipe, run_dir=None) -> Launcher:
    """The runner's launcher factory (`--launcher-factory remote.launchers:launcher_for`): SSH over the
    recipe's [cluster]; a recipe without nodes runs on this machine (engine's local launcher)."""
    cluster = getattr(recipe, "cluster", recipe)
    if not (getattr(cluster, "nodes", None) or (isinstance(cluster, dict) and cluster.get("nodes"))):
        from engine.runs.local_launcher import LocalLauncher

        return LocalLauncher()
    return SSHLauncher(cluster)
