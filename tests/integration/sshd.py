"""Four real OpenSSH servers on 127.0.0.1-127.0.0.4: the test cluster.

Each node is Debian's /usr/sbin/sshd started in the foreground with a generated config: its own host
key, key-only login (root allowed, StrictModes off) with a client key made for the test, and a per-test
known_hosts listing the four host keys. They all see this machine's filesystem, so the work dir is shared
exactly as a cluster's shared FS would be. Nodes can be killed and restarted on the same port.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

SSHD = os.environ.get("QUANTDECK_TEST_SSHD") or shutil.which("sshd") or "/usr/sbin/sshd"
ADDRS = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4")
REPO = Path(__file__).resolve().parents[2]


def free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def keygen(path: Path, comment: str) -> Path:
    """An ed25519 key pair in OpenSSH format (ssh-keygen, or `cryptography` where ssh-keygen is missing)."""
    if shutil.which("ssh-keygen"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                       check=True, capture_output=True)
        return path
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    os.chmod(path, 0o600)
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    Path(f"{path}.pub").write_text(f"{pub.decode()} {comment}\n")
    return path


@dataclass
class SshdNode:
    name: str
    addr: str
    port: int
    config: Path
    log: Path
    host_pub: Path
    proc: subprocess.Popen | None = None

    @property
    def known_hosts_line(self) -> str:
        typ, blob = self.host_pub.read_text().split()[:2]
        return f"[{self.addr}]:{self.port} {typ} {blob}\n"

    def start(self, wait_s: float = 10.0) -> None:
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"))
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd {self.name} exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection((self.addr, self.port), timeout=0.5) as s:
                    s.settimeout(2)
                    if s.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sshd {self.name} did not start: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        """Kill the node's sshd and its per-connection sshd processes: clients' connections drop at once.

        Processes started detached through it (setsid) are not sshd's descendants any more and live on.
        """
        if self.proc is None:
            return
        try:
            kids = [p for p in psutil.Process(self.proc.pid).children(recursive=True)
                    if p.name().startswith("sshd")]
        except psutil.NoSuchProcess:
            kids = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        for p in kids:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class SshdCluster:
    root: Path
    nodes: list[SshdNode]
    client_key: Path
    known_hosts: Path
    ssh_config: Path
    work_dir: Path
    user: str = field(default_factory=getpass.getuser)

    def node(self, name: str) -> SshdNode:
        return next(n for n in self.nodes if n.name == name)

    def cluster_dict(self, **extra) -> dict:
        """A recipe-shaped [cluster] section for these nodes (dict; remote.hosts.cluster_from reads it)."""
        d = {
            "nodes": [{"name": n.name, "host": n.addr, "port": n.port, "user": self.user,
                       "key": str(self.client_key), "gpus": 0} for n in self.nodes],
            "head": self.nodes[0].name,
            "work_dir": str(self.work_dir),
            "python": sys.executable,
            "cwd": str(REPO),
            "env": {"PYTHONPATH": str(REPO)},
            "known_hosts": str(self.known_hosts),
            "ssh_config": str(self.ssh_config),
            "connect_timeout": 5.0,
            "keepalive_s": 2.0,
        }
        d.update(extra)
        return d

    def stop(self) -> None:
        for n in self.nodes:
            n.kill()


def start_cluster(root: Path, n: int = 4) -> SshdCluster:
    root.mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation dir
    client_key = keygen(root / "client_ed25519", "quantdeck-test-client")
    auth = root / "authorized_keys"
    auth.write_text((root / "client_ed25519.pub").read_text())
    os.chmod(auth, 0o600)
    nodes: list[SshdNode] = []
    for i, addr in enumerate(ADDRS[:n]):
        name = f"node{i}"
        hostkey = keygen(root / f"host_{name}", f"{name}-hostkey")
        port = free_port(addr)
        cfg = root / f"sshd_{name}.conf"
        cfg.write_text("\n".join([
            f"Port {port}", f"ListenAddress {addr}", f"HostKey {hostkey}",
            f"PidFile {root / f'sshd_{name}.pid'}", f"AuthorizedKeysFile {auth}",
            "PermitRootLogin prohibit-password", "PubkeyAuthentication yes", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "PrintMotd no",
            "PrintLastLog no", "X11Forwarding no", "MaxStartups 100", "MaxSessions 100",
            "Subsystem sftp internal-sftp", "LogLevel INFO", "",
        ]))
        nodes.append(SshdNode(name, addr, port, cfg, root / f"sshd_{name}.log", root / f"host_{name}.pub"))
    known = root / "known_hosts"
    known.write_text("".join(nd.known_hosts_line for nd in nodes))
    ssh_config = root / "ssh_config"
    ssh_config.write_text("# per-test ssh config: the operator's ~/.ssh/config is never read\n")
    work = root / "work"
    work.mkdir()
    cluster = SshdCluster(root, nodes, client_key, known, ssh_config, work)
    try:
        for nd in nodes:
            nd.start()
    except Exception:
        cluster.stop()
        raise
    return cluster
