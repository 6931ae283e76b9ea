"""Which machines a run uses: the cluster's nodes, resolved through the operator's ssh config.

A recipe's `[cluster]` names nodes (name, host, user, port, key, gpus) and a head. `host` may be an
alias from `~/.ssh/config` (HostName, User, Port, IdentityFile, ProxyJump are honoured); a value given in
the recipe wins over the ssh config, as `ssh -p` wins over `Port`. The ssh config path is overridable
(recipe `ssh_config`, or QUANTDECK_SSH_CONFIG) so tests never read the operator's own.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

from engine.core.errors import RecipeError
from engine.core.settings import settings

HOST_KEY_POLICIES = ("reject", "accept-new")
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_KEEPALIVE = 15.0


@dataclass(frozen=True)
class NodeSpec:
    """One node as the recipe writes it; None means 'from the ssh config, else the default'."""

    name: str
    host: str
    user: str | None = None
    port: int | None = None
    key: str | None = None
    gpus: int = 0


@dataclass(frozen=True)
class ClusterSpec:
    """The nodes and how to reach them. `head` runs single-node stages and is the torchrun master."""

    nodes: tuple[NodeSpec, ...]
    head: str | None = None
    work_dir: str | None = None  # the shared work dir, as the nodes see it
    python: str = "python3"  # python on the nodes
    cwd: str | None = None  # where remote commands run (a checkout of quantdeck, or None: home)
    env: Mapping[str, str] = field(default_factory=dict)  # passed to every worker, explicitly
    known_hosts: str | None = None  # default ~/.ssh/known_hosts
    host_key_policy: str = "reject"  # or "accept-new" (explicit; records the key it accepts)
    ssh_config: str | None = None  # default $QUANTDECK_SSH_CONFIG or ~/.ssh/config
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    keepalive_s: float = DEFAULT_KEEPALIVE
    master_addr: str | None = None  # torchrun master address as the nodes see the head (default: its HostName)

    def __post_init__(self) -> None:
        if not self.nodes:
            raise RecipeError("the cluster has no nodes", at="cluster.nodes",
                              hint="add [[cluster.nodes]] entries with name and host")
        names = [n.name for n in self.nodes]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise RecipeError(f"node names repeat: {', '.join(dup)}", at="cluster.nodes",
                              hint="give every node its own name")
        if self.head is not None and self.head not in names:
            raise RecipeError(f"head {self.head!r} is not a node; nodes: {', '.join(names)}",
                              at="cluster.head", hint="set head to one of the node names")
        if self.host_key_policy not in HOST_KEY_POLICIES:
            raise RecipeError(f"host_key_policy {self.host_key_policy!r} is unknown; known: "
                              f"{', '.join(HOST_KEY_POLICIES)}", at="cluster.host_key_policy")

    @property
    def head_name(self) -> str:
        return self.head or self.nodes[0].name

    def node(self, name: str) -> NodeSpec:
        for n in self.nodes:
            if n.name == name:
                return n
        raise RecipeError(f"no node named {name!r}; nodes: {', '.join(n.name for n in self.nodes)}",
                          at="cluster.nodes")

    @property
    def known_hosts_path(self) -> Path:
        return Path(os.path.expanduser(self.known_hosts or "~/.ssh/known_hosts"))

    @property
    def ssh_config_path(self) -> Path:
        raw = self.ssh_config or settings().ssh_config or "~/.ssh/config"
        return Path(os.path.expanduser(raw))


@dataclass(frozen=True)
class Host:
    """A node resolved to what paramiko needs. `jump` is the ProxyJump hop, resolved the same way."""

    name: str
    hostname: str
    port: int
    user: str
    key_filenames: tuple[str, ...] = ()
    jump: "Host | None" = None
    gpus: int = 0

    @property
    def known_hosts_name(self) -> str:
        """How known_hosts (and ssh-keyscan) spell this host: `host` on 22, `[host]:port` otherwise."""
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.user}@{self.hostname}:{self.port}"


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def node_from(obj: Any) -> NodeSpec:
    """A NodeSpec from a dict, a dataclass or a pydantic model with the same field names."""
    if isinstance(obj, NodeSpec):
        return obj
    if isinstance(obj, str):  # nodes = ["gpu-a", "gpu-b"]: name = host (an ssh config alias, often)
        return NodeSpec(name=obj, host=obj)
    name, host = _get(obj, "name"), _get(obj, "host")
    if not name:
        raise RecipeError("a cluster node needs a name and a host", at="cluster.nodes")
    port = _get(obj, "port")
    given = getattr(obj, "model_fields_set", None)  # a pydantic recipe model: a default is not a choice
    if given is not None and "port" not in given:
        port = None  # so ~/.ssh/config's Port applies, as with `ssh alias`
    return NodeSpec(name=str(name), host=str(host or name), user=_get(obj, "user"),
                    port=int(port) if port is not None else None, key=_get(obj, "key"),
                    gpus=int(_get(obj, "gpus", 0) or 0))


ALIASES = {"work_dir": ("work_dir", "workdir")}
SETTING_FALLBACKS = {"known_hosts": "known_hosts", "ssh_config": "ssh_config", "cwd": "remote_cwd",
                     "master_addr": "master_addr"}  # ClusterSpec field -> engine.core.settings.Settings field


def cluster_from(obj: Any, **overrides: Any) -> ClusterSpec:
    """A ClusterSpec from a recipe's cluster section (dict, dataclass or pydantic model), plus overrides.

    Reads engine.runs.recipe's ClusterSection (nodes, head, python, workdir, host_key_policy, gpus_per_node) and
    the optional known_hosts / ssh_config / cwd / env / connect_timeout / master_addr; known_hosts, ssh_config,
    cwd and master_addr fall back to QUANTDECK_KNOWN_HOSTS / _SSH_CONFIG / _REMOTE_CWD / _MASTER_ADDR.
    """
    if isinstance(obj, ClusterSpec) and not overrides:
        return obj
    s = settings()
    kw: dict[str, Any] = {}
    for f in fields(ClusterSpec):
        if f.name == "nodes":
            continue
        for key in ALIASES.get(f.name, (f.name,)):
            v = _get(obj, key)
            if v is not None:
                kw[f.name] = dict(v) if f.name == "env" else v
                break
        if f.name not in kw and f.name in SETTING_FALLBACKS and getattr(s, SETTING_FALLBACKS[f.name]):
            kw[f.name] = getattr(s, SETTING_FALLBACKS[f.name])
    kw.update({k: v for k, v in overrides.items() if v is not None})
    default_gpus = int(_get(obj, "gpus_per_node", 0) or 0)
    nodes = []
    for n in (_get(obj, "nodes") or ()):
        spec = node_from(n)
        if not spec.gpus and default_gpus:
            spec = NodeSpec(spec.name, spec.host, spec.user, spec.port, spec.key, default_gpus)
        nodes.append(spec)
    return ClusterSpec(nodes=tuple(nodes), **kw)


def load_ssh_config(path: Path):
    """paramiko's SSHConfig for `path`, or an empty one when the file is missing."""
    import paramiko

    if path.is_file():
        return paramiko.SSHConfig.from_path(str(path))
    return paramiko.SSHConfig.from_text("")


def _parse_jump(spec: str) -> tuple[str | None, str, int | None]:
    """'user@host:port' → (user, host, port); also '[v6]:port'."""
    user = None
    if "@" in spec:
        user, spec = spec.rsplit("@", 1)
    port = None
    if spec.startswith("[") and "]" in spec:
        host, _, rest = spec[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif spec.count(":") == 1:
        host, p = spec.split(":")
        port = int(p)
    else:
        host = spec
    return user, host, port


def resolve_host(node: NodeSpec, ssh_config_path: Path | None = None, *, _config=None,
                 _depth: int = 0) -> Host:
    """Resolve a node through the ssh config: recipe values first, then the config, then defaults."""
    cfg = _config if _config is not None else load_ssh_config(ssh_config_path or Path("~/.ssh/config").expanduser())
    look = cfg.lookup(node.host)
    hostname = look.get("hostname", node.host)
    user = node.user or look.get("user") or getpass.getuser()
    port = node.port or int(look.get("port", 22))
    keys: Iterable[str] = [node.key] if node.key else look.get("identityfile", [])
    key_filenames = tuple(os.path.expanduser(k) for k in keys)
    jump = None
    proxy = look.get("proxyjump")
    if proxy and proxy.lower() != "none":
        if _depth > 4:
            raise RecipeError(f"ProxyJump chain for {node.host!r} is too deep", at=f"ssh config:{node.host}")
        hops = [h.strip() for h in proxy.split(",") if h.strip()]
        prev: Host | None = None
        for hop in hops:  # the first hop is reached directly, each next one through the previous
            juser, jhost, jport = _parse_jump(hop)
            h = resolve_host(NodeSpec(name=f"{node.name}-jump", host=jhost, user=juser, port=jport),
                             _config=cfg, _depth=_depth + 1)
            prev = Host(h.name, h.hostname, h.port, h.user, h.key_filenames, jump=prev if h.jump is None else h.jump)
        jump = prev
    if "proxycommand" in look and jump is None:
        raise RecipeError(f"ssh config for {node.host!r} uses ProxyCommand, which quantdeck does not run",
                          at=f"ssh config:{node.host}", hint="use ProxyJump instead")
    return Host(name=node.name, hostname=hostname, port=port, user=user, key_filenames=key_filenames,
                jump=jump, gpus=node.gpus)


def resolve_cluster(cluster: ClusterSpec) -> dict[str, Host]:
    """Every node of the cluster, resolved, in recipe order."""
    cfg = load_ssh_config(cluster.ssh_config_path)
    return {n.name: resolve_host(n, _config=cfg) for n in cluster.nodes}
