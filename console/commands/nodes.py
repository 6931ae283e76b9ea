"""`quantdeck nodes [RECIPE]`: the fleet's telemetry once, or live with --watch.

Per node its state (ok, no GPU, unreachable, stale with the age of its last good sample), per GPU its
memory, utilization and temperature, and the node's RAM and free disk of the work dir. Without a recipe
(or with one that has no [cluster] nodes) it reads this machine. The table goes to stdout; the exit code
is 6 when a node could not be read.
"""

from __future__ import annotations

import json
import sys
import time

import click

GIB = 1 << 30


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.1f}"


def _num(v: float | None, unit: str) -> str:
    return "-" if v is None else f"{v:.0f}{unit}"


def format_samples(samples, now: float | None = None) -> str:
    """A fixed-width table: one line per GPU (or one per node without GPUs)."""
    now = time.time() if now is None else now
    head = f"{'NODE':<12} {'STATE':<16} {'GPU':>3}  {'NAME':<24} {'MEM GiB':>15} {'UTIL':>5} {'TEMP':>5}  " \
           f"{'RAM GiB':>15} {'DISK FREE':>10}"
    lines = [head]
    for s in samples:
        state = s.state.label
        if s.state.value == "stale":
            state = f"stale ({s.age:.0f}s)"
        ram = f"{_gib(s.ram_used)}/{_gib(s.ram_total)}" if s.ram_total else "-"
        disk = f"{_gib(s.disk_free)}" if s.disk_free is not None else "-"
        rows = s.gpus or [None]
        for i, g in enumerate(rows):
            node = s.node if i == 0 else ""
            st = state if i == 0 else ""
            tail = f"  {ram:>15} {disk:>10}" if i == 0 else ""
            if g is None:
                lines.append(f"{node:<12} {st:<16} {'-':>3}  {'-':<24} {'-':>15} {'-':>5} {'-':>5}{tail}")
            else:
                mem = f"{_gib(g.mem_used)}/{_gib(g.mem_total)}"
                lines.append(f"{node:<12} {st:<16} {g.index:>3}  {g.name[:24]:<24} {mem:>15} "
                             f"{_num(g.util, '%'):>5} {_num(g.temp, 'C'):>5}{tail}")
        if s.error and s.state.value != "ok":
            lines.append(f"{'':<12} ! {s.error[:150]}")
    return "\n".join(lines)


def samples_json(samples) -> str:
    out = []
    for s in samples:
        d = {k: getattr(s, k) for k in ("node", "ram_used", "ram_total", "disk_free", "ts", "error", "age")}
        d["state"] = s.state.value
        d["gpus"] = [g.__dict__ for g in s.gpus]
        out.append(d)
    return json.dumps(out, indent=2)


def _source(recipe: str | None, demo: bool, interval: float):
    if demo:
        from remote.telemetry import ReplayTelemetrySource

        return ReplayTelemetrySource.demo(interval_s=interval), 0.0
    from remote.hosts import cluster_from
    from remote.monitor import TelemetryMonitor

    if recipe is None:
        return TelemetryMonitor.local(".", interval_s=interval), 2.0
    from engine.api import load_recipe

    r = load_recipe(recipe)
    if not r.cluster.nodes:
        return TelemetryMonitor.local(r.run.workdir, interval_s=interval), 2.0
    cluster = cluster_from(r.cluster, work_dir=r.cluster.workdir or r.run.workdir)
    return TelemetryMonitor.for_cluster(cluster, interval_s=interval), cluster.connect_timeout + 5.0


@click.command("nodes")
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@click.option("--watch", is_flag=True, help="Keep refreshing until Ctrl-C (or --count refreshes).")
@click.option("--count", type=click.IntRange(min=1), default=None,
              help="With --watch: stop after this many tables (default: until Ctrl-C).")
@click.option("--interval", default=2.0, show_default=True, help="Seconds between samples.")
@click.option("--json", "as_json", is_flag=True, help="Print samples as JSON.")
@click.option("--demo", is_flag=True, help="Replay recorded H100/H200 telemetry instead of reading nodes.")
def nodes(recipe: str | None, watch: bool, count: int | None, interval: float, as_json: bool, demo: bool) -> None:
    """Show each node's GPUs, RAM and free disk (the recipe's [cluster], or this machine)."""
    from engine.core.errors import RemoteError

    src, first_wait = _source(recipe, demo, interval)
    src.start()
    try:
        deadline = time.monotonic() + first_wait
        while time.monotonic() < deadline and not all(src.history(n, 1) for n in src.nodes()):
            time.sleep(0.05)
        shown = 0
        while True:
            snap = src.snapshot()
            text = samples_json(snap) if as_json else format_samples(snap)
            if watch and sys.stdout.isatty():
                click.echo("\x1b[H\x1b[2J", nl=False)
            click.echo(text)
            shown += 1
            if not watch or (count is not None and shown >= count):
                break
            time.sleep(interval)
    except KeyboardInterrupt:
        return
    finally:
        close = getattr(src, "close", src.stop)
        close()
    bad = [s for s in snap if s.state.value in ("unreachable", "stale")]
    if bad:
        raise RemoteError(f"{len(bad)} of {len(snap)} nodes not read: "
                          + "; ".join(f"{s.node}: {s.error}" for s in bad),
                          at=bad[0].node, hint="check the node and its sshd; see the table above")


COMMANDS = (nodes,)
