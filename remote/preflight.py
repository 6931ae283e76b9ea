"""Per-node preflight: every node of the recipe's [cluster] is reached and checked, all at once, in bounded time.

On each node: the SSH connection (host key verified), quantdeck importable by the cluster's python, the
shared work dir present and writable, and as many GPUs as the recipe says; and what memory it has (host RAM
from /proc/meminfo, each GPU's free memory from nvidia-smi), which engine.runs.preflight's memory check compares
with what each rank of the run's stages needs (`Facts.node_memory`). A node that does not answer
fails by name within its connect timeout; one slow node never delays the others' results. Plug it into
engine.runs.preflight.run_preflight as an extra check: `extra_checks=(remote.preflight.check_nodes,)`.
"""

from __future__ import annotations

import concurrent.futures as cf
import shlex
from typing import Any

from engine.core.errors import QuantdeckError
from remote.hosts import ClusterSpec, cluster_from
from remote.ssh import ConnectionPool

# $1 python, $2 work dir. One line per fact: "key value".
NODE_SCRIPT = (
    'py=$1; wd=$2; '
    'echo "import $("$py" -c "import engine, sys; print(sys.version.split()[0])" 2>&1 | tail -n 1)"; '
    'if [ -d "$wd" ]; then t="$wd/.qd-preflight-$$"; '
    '  if touch "$t" 2>/dev/null; then rm -f "$t"; echo "workdir ok"; else echo "workdir readonly"; fi; '
    'else echo "workdir missing"; fi; '
    'n=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | grep -c .); echo "gpus $n"; '
    "echo \"mem $(awk '/^MemTotal:/ {t=$2} /^MemAvailable:/ {a=$2} END {print t, a}' /proc/meminfo 2>/dev/null)\"; "
    "echo \"gpumem $(nvidia-smi --query-gpu=memory.total,memory.used --format=csv,noheader,nounits 2>/dev/null "
    "| tr -d ' ' | paste -sd ';' -)\""
)
KIB, MIB = 1 << 10, 1 << 20


def _facts(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        out[k] = v.strip()
    return out


def node_memory(node: str, f: dict[str, str]):
    """What the node script found of a node's memory: an engine.runs.memory_check.NodeMemory."""
    from engine.runs.memory_check import NodeMemory

    kb = [int(x) for x in f.get("mem", "").split() if x.isdigit()]
    free = []
    for gpu in filter(None, f.get("gpumem", "").split(";")):
        total, _, used = gpu.partition(",")
        try:
            free.append(int((float(total) - float(used or 0)) * MIB))
        except ValueError:  # [N/A] or a torn line: this GPU's memory is unknown
            return NodeMemory(node, kb[0] * KIB if kb else None, kb[1] * KIB if len(kb) > 1 else None)
    return NodeMemory(node, kb[0] * KIB if kb else None, kb[1] * KIB if len(kb) > 1 else None,
                      tuple(free) or None)


def check_node(pool: ConnectionPool, cluster: ClusterSpec, node: str, memory: dict | None = None) -> list[str]:
    """Failures of one node, each naming it and saying what to do; `memory[node]` gets what memory it has."""
    spec = cluster.node(node)
    try:
        conn = pool.get(node)
        res = conn.run(["sh", "-c", NODE_SCRIPT, "qd", cluster.python, cluster.work_dir or "."],
                       env=dict(cluster.env), cwd=cluster.cwd, timeout=max(30.0, cluster.connect_timeout))
    except QuantdeckError as e:
        return [f"node {node}: {e.msg} (fix: {e.hint or 'check the node'})"]
    f = _facts(res.stdout)
    if memory is not None:
        memory[node] = node_memory(node, f)
    fails = []
    imp = f.get("import", "")
    if not imp[:1].isdigit():
        fails.append(f"node {node}: `{cluster.python} -c 'import engine'` failed: {imp[-200:]} "
                     f"(fix: install quantdeck on {node}, or set [cluster] python to the right interpreter)")
    wd = f.get("workdir")
    if cluster.work_dir and wd != "ok":
        fails.append(f"node {node}: work dir {cluster.work_dir} is {wd or 'unknown'} there "
                     f"(fix: mount the shared work dir at {shlex.quote(cluster.work_dir)} on {node}, writable)")
    have = int(f.get("gpus", "0") or 0)
    if spec.gpus and have < spec.gpus:
        fails.append(f"node {node}: the recipe says {spec.gpus} GPUs, nvidia-smi sees {have} "
                     f"(fix: check the driver on {node}, or lower gpus for it)")
    return fails


def preflight_cluster(cluster: Any, pool: ConnectionPool | None = None, memory: dict | None = None) -> list[str]:
    """Check every node in parallel; returns one line per failure, in cluster order ([] = all ready).
    `memory` (a dict) gets each node that answered: its engine.runs.memory_check.NodeMemory."""
    cluster = cluster_from(cluster)
    own = pool is None
    pool = pool or ConnectionPool.for_cluster(cluster)
    try:
        with cf.ThreadPoolExecutor(max_workers=min(32, len(cluster.nodes))) as ex:
            futs = {n.name: ex.submit(check_node, pool, cluster, n.name, memory) for n in cluster.nodes}
            return [line for n in cluster.nodes for line in futs[n.name].result()]
    finally:
        if own:
            pool.close()


def check_nodes(facts) -> list[str]:
    """engine.runs.preflight Check: the per-node checks for a recipe with [cluster] nodes (none: nothing to do)."""
    recipe = facts.recipe
    if not recipe.cluster.nodes:
        return []
    work = recipe.cluster.workdir or facts.paths.get("workdir") or recipe.run.workdir
    return preflight_cluster(cluster_from(recipe.cluster, work_dir=work), memory=facts.node_memory)
