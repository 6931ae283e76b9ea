"""One verified, kept-alive paramiko connection per node, shared by commands, file reads and telemetry.

Host keys are checked against the known_hosts file; an unknown key is refused (HostKeyError carrying
the SHA256 fingerprint and the exact way to accept it) unless the cluster says `accept-new`, which then
records the key in that file. Connects are bounded in time; a dropped connection is re-opened with
backoff. Commands are argument lists joined with shlex.quote; environment is passed explicitly, and
anything that looks like a secret goes through the channel's stdin, never onto a command line.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import shlex
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import paramiko

from engine.core.errors import HostKeyError, RemoteError
from remote.hosts import DEFAULT_CONNECT_TIMEOUT, DEFAULT_KEEPALIVE, Host

log = logging.getLogger("quantdeck.remote")

SECRET_NAME = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|_KEY$|^AWS_SESSION|PRIVATE)", re.I)
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Reads `export K='v'` lines from stdin (sent over the encrypted channel), then runs the argv.
SECRET_PRELUDE = 'eval "$(cat)"; exec "$@"'


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    rc: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint: `SHA256:` + unpadded base64 of sha256(key blob)."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def split_env(env: Mapping[str, str] | None) -> tuple[dict[str, str], dict[str, str]]:
    """(plain, secret): names that look like credentials never go onto a command line."""
    plain, secret = {}, {}
    for k, v in (env or {}).items():
        if not ENV_NAME.match(k):
            raise RemoteError(f"bad environment variable name {k!r}", hint="use letters, digits and _")
        (secret if is_secret_name(k) else plain)[k] = str(v)
    return plain, secret


def build_command(argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | None = None) -> str:
    """The remote shell line for `argv`: every piece shlex-quoted; env as an `env K=V …` prefix.

    Secret-looking names are refused here (send them with `secret_stdin`); nothing is pasted raw.
    """
    if not argv:
        raise RemoteError("empty command")
    plain, secret = split_env(env)
    if secret:
        raise RemoteError(f"refusing to put {', '.join(sorted(secret))} on a command line",
                          hint="pass secrets with secret_env= (sent over the channel's stdin)")
    parts = [shlex.quote(str(a)) for a in argv]
    if plain:
        parts = ["env"] + [shlex.quote(f"{k}={v}") for k, v in plain.items()] + parts
    line = " ".join(parts)
    if cwd:
        line = f"cd {shlex.quote(cwd)} && {line}"
    return line


def secret_stdin(secret: Mapping[str, str]) -> bytes:
    """The stdin that SECRET_PRELUDE evaluates: `export K='v'` lines (values quoted, never on argv)."""
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in secret.items()).encode()


def _hint_accept(host: Host, known_hosts: Path) -> str:
    return (f"check the fingerprint with the node's admin, then run `ssh-keyscan -p {host.port} "
            f"{host.hostname} >> {known_hosts}`, or set host_key_policy = \"accept-new\" in the recipe's [cluster]")


class _VerifyPolicy(paramiko.MissingHostKeyPolicy):
    """Reject unknown keys with their fingerprint; or, for accept-new, record them in `known_hosts`."""

    def __init__(self, host: Host, known_hosts: Path, accept_new: bool):
        self.host, self.known_hosts, self.accept_new = host, known_hosts, accept_new

    def missing_host_key(self, client, hostname, key):
        fp = fingerprint(key)
        if not self.accept_new:
            raise HostKeyError(
                f"unknown host key for {self.host.name} ({hostname}): {key.get_name()} {fp}; not in {self.known_hosts}",
                at=self.host.name, hint=_hint_accept(self.host, self.known_hosts))
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        with open(self.known_hosts, "a", encoding="ascii") as fh:
            fh.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        os.chmod(self.known_hosts, 0o600)
        client.get_host_keys().add(hostname, key.get_name(), key)
        log.warning("accepted new host key for %s (%s): %s %s, recorded in %s",
                    self.host.name, hostname, key.get_name(), fp, self.known_hosts)


def backoff_delays(base: float = 0.5, factor: float = 2.0, cap: float = 30.0):
    """0.5, 1, 2, 4, … capped: how long to wait before the next reconnect try."""
    d = base
    while True:
        yield d
        d = min(d * factor, cap)


class SSHConnection:
    """A node's one connection. Thread-safe: commands, SFTP reads and telemetry share it."""

    def __init__(self, host: Host, known_hosts: Path, *, host_key_policy: str = "reject",
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, keepalive_s: float = DEFAULT_KEEPALIVE,
                 backoff_cap: float = 30.0):
        self.host = host
        self.known_hosts = Path(known_hosts)
        self.accept_new = host_key_policy == "accept-new"
        self.connect_timeout = connect_timeout
        self.keepalive_s = keepalive_s
        self.backoff_cap = backoff_cap
        self._client: paramiko.SSHClient | None = None
        self._jump: SSHConnection | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._lock = threading.RLock()
        self._sftp_lock = threading.Lock()
        self._delays = backoff_delays(cap=backoff_cap)
        self._retry_at = 0.0
        self.last_error: str | None = None
        self.connects = 0

    # ------------------------------------------------------------------ connection
    @property
    def connected(self) -> bool:
        t = self._client.get_transport() if self._client else None
        return bool(t and t.is_active())

    def _open_sock(self):
        if self.host.jump is None:
            return None
        if self._jump is None:
            self._jump = SSHConnection(self.host.jump, self.known_hosts,
                                       host_key_policy="accept-new" if self.accept_new else "reject",
                                       connect_timeout=self.connect_timeout, keepalive_s=self.keepalive_s)
        transport = self._jump.ensure().get_transport()
        try:
            return transport.open_channel("direct-tcpip", (self.host.hostname, self.host.port), ("127.0.0.1", 0),
                                          timeout=self.connect_timeout)
        except (paramiko.SSHException, OSError) as e:
            raise RemoteError(f"{self.host.name}: jump host {self.host.jump.hostname} could not reach "
                              f"{self.host.hostname}:{self.host.port}: {e}", at=self.host.name) from e

    def connect(self) -> paramiko.SSHClient:
        """Open (or re-open) the connection now; raises RemoteError / HostKeyError naming the node."""
        with self._lock:
            self.close()
            client = paramiko.SSHClient()
            client.load_host_keys(str(self.known_hosts)) if self.known_hosts.is_file() else None
            client.set_missing_host_key_policy(_VerifyPolicy(self.host, self.known_hosts, self.accept_new))
            t = self.connect_timeout
            try:
                client.connect(self.host.hostname, port=self.host.port, username=self.host.user,
                               key_filename=list(self.host.key_filenames) or None, sock=self._open_sock(),
                               timeout=t, banner_timeout=t, auth_timeout=t, channel_timeout=t,
                               allow_agent=False, look_for_keys=not self.host.key_filenames)
            except HostKeyError:
                client.close()
                raise
            except paramiko.BadHostKeyException as e:
                client.close()
                raise HostKeyError(
                    f"host key for {self.host.name} ({self.host.known_hosts_name}) CHANGED: got "
                    f"{e.key.get_name()} {fingerprint(e.key)}, known_hosts has {fingerprint(e.expected_key)}",
                    at=self.host.name,
                    hint=f"if the node was reinstalled, `ssh-keygen -R '{self.host.known_hosts_name}' -f "
                         f"{self.known_hosts}` and accept the new key; otherwise treat it as an attack") from e
            except paramiko.AuthenticationException as e:
                client.close()
                raise RemoteError(f"{self.host.name}: authentication failed for {self.host.address}",
                                  at=self.host.name,
                                  hint="check the node's user and key (recipe or ~/.ssh/config IdentityFile)") from e
            except (OSError, socket.timeout, paramiko.SSHException, EOFError) as e:
                client.close()
                raise RemoteError(f"{self.host.name} ({self.host.address}) does not answer: "
                                  f"{type(e).__name__}: {e or 'timed out'}", at=self.host.name,
                                  hint=f"is the node up and sshd listening on port {self.host.port}? "
                                       f"(gave up after {self.connect_timeout:g}s)") from e
            transport = client.get_transport()
            if self.keepalive_s:
                transport.set_keepalive(int(max(1, self.keepalive_s)))
            self._client = client
            self._delays = backoff_delays(cap=self.backoff_cap)
            self._retry_at = 0.0
            self.last_error = None
            self.connects += 1
            return client

    def ensure(self) -> paramiko.SSHClient:
        """The live client; reconnects when it dropped, at most once per backoff delay (then raises at once)."""
        with self._lock:
            if self.connected:
                return self._client  # type: ignore[return-value]
            now = time.monotonic()
            if now < self._retry_at:
                raise RemoteError(f"{self.host.name} is unreachable ({self.last_error}); next try in "
                                  f"{self._retry_at - now:.1f}s", at=self.host.name)
            try:
                return self.connect()
            except HostKeyError:
                raise
            except RemoteError as e:
                self.last_error = e.msg
                self._retry_at = time.monotonic() + next(self._delays)
                raise

    def close(self) -> None:
        with self._lock:
            if self._sftp is not None:
                try:
                    self._sftp.close()
                except Exception:  # noqa: BLE001 - closing a dead channel
                    pass
                self._sftp = None
            if self._client is not None:
                self._client.close()
                self._client = None

    def close_all(self) -> None:
        self.close()
        if self._jump is not None:
            self._jump.close_all()

    # ------------------------------------------------------------------ commands
    def run(self, argv: Sequence[str], env: Mapping[str, str] | None = None, *, cwd: str | None = None,
            timeout: float | None = 60.0, check: bool = False) -> CommandResult:
        """Run `argv` on the node (quoted), wait for it; secrets in `env` go over stdin, not argv."""
        plain, secret = split_env(env)
        run_argv = list(argv)
        if secret:
            run_argv = ["sh", "-c", SECRET_PRELUDE, "qd"] + run_argv
        line = build_command(run_argv, plain, cwd)
        client = self.ensure()
        try:
            chan = client.get_transport().open_session(timeout=self.connect_timeout)
            chan.settimeout(timeout)
            chan.exec_command(line)
            if secret:
                chan.sendall(secret_stdin(secret))
            chan.shutdown_write()
            out, err = bytearray(), bytearray()
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                if chan.recv_ready():
                    out += chan.recv(65536)
                elif chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                elif chan.exit_status_ready() and (chan.eof_received or chan.closed):
                    break
                else:
                    if deadline is not None and time.monotonic() > deadline:
                        chan.close()
                        raise RemoteError(
                            f"{self.host.name}: `{shlex.join(argv)[:200]}` did not finish in {timeout:g}s",
                            at=self.host.name)
                    if chan.closed and not chan.exit_status_ready():
                        raise RemoteError(f"{self.host.name}: connection lost while running a command",
                                          at=self.host.name)
                    time.sleep(0.01)
            rc = chan.recv_exit_status() if chan.status_event.is_set() else -1
            chan.close()
            if rc == -1:  # paramiko's "closed without an exit status": the connection went away under it
                raise paramiko.SSHException("channel closed before the command's exit status arrived")
        except (paramiko.SSHException, OSError, EOFError) as e:
            self.close()
            raise RemoteError(f"{self.host.name}: connection lost: {type(e).__name__}: {e}", at=self.host.name,
                              hint="it will reconnect on the next call") from e
        res = CommandResult(tuple(argv), rc, out.decode(errors="replace"), err.decode(errors="replace"))
        if check and not res.ok:
            raise RemoteError(f"{self.host.name}: `{shlex.join(argv)[:200]}` exited {rc}: "
                              f"{res.stderr.strip()[-300:]}", at=self.host.name)
        return res

    # ------------------------------------------------------------------ files
    def sftp(self) -> paramiko.SFTPClient:
        with self._lock:
            client = self.ensure()
            if self._sftp is None:
                self._sftp = client.open_sftp()
                self._sftp.get_channel().settimeout(max(self.connect_timeout, 30.0))
            return self._sftp

    def read_bytes(self, path: str, offset: int = 0, limit: int | None = None) -> bytes:
        """Bytes of `path` from `offset` over SFTP; b"" when the file does not exist (yet)."""
        try:
            with self._sftp_lock:
                sftp = self.sftp()
                try:
                    with sftp.open(path, "rb") as fh:
                        fh.seek(offset)
                        return fh.read(limit) if limit else fh.read()
                except FileNotFoundError:
                    return b""
        except (paramiko.SSHException, EOFError, socket.timeout, ConnectionError) as e:
            self.close()
            raise RemoteError(f"{self.host.name}: lost the connection reading {path}: {e}", at=self.host.name) from e
        except OSError as e:
            if getattr(e, "errno", None) == 2:
                return b""
            self.close()
            raise RemoteError(f"{self.host.name}: cannot read {path}: {e}", at=self.host.name) from e


class ConnectionPool:
    """One SSHConnection per node name, created on first use."""

    def __init__(self, hosts: Mapping[str, Host], known_hosts: Path, *, host_key_policy: str = "reject",
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, keepalive_s: float = DEFAULT_KEEPALIVE,
                 backoff_cap: float = 30.0):
        self.hosts = dict(hosts)
        self._kw = dict(host_key_policy=host_key_policy, connect_timeout=connect_timeout,
                        keepalive_s=keepalive_s, backoff_cap=backoff_cap)
        self.known_hosts = Path(known_hosts)
        self._conns: dict[str, SSHConnection] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_cluster(cls, cluster, **kw) -> "ConnectionPool":
        from remote.hosts import resolve_cluster

        opts = dict(host_key_policy=cluster.host_key_policy, connect_timeout=cluster.connect_timeout,
                    keepalive_s=cluster.keepalive_s)
        opts.update(kw)
        return cls(resolve_cluster(cluster), cluster.known_hosts_path, **opts)

    def get(self, node: str) -> SSHConnection:
        with self._lock:
            if node not in self._conns:
                if node not in self.hosts:
                    raise RemoteError(f"no node named {node!r}; nodes: {', '.join(self.hosts)}", at=node)
                self._conns[node] = SSHConnection(self.hosts[node], self.known_hosts, **self._kw)
            return self._conns[node]

    def close(self) -> None:
        with self._lock:
            for c in self._conns.values():
                c.close_all()
            self._conns.clear()
