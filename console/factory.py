"""The one factory that builds the console app; the CLI, the demo, tests and the benchmark all use it."""

from __future__ import annotations

import time
from typing import Callable

from console.app import QuantdeckApp
from console.backend import Backend
from console.fleet import FleetFeed, LazyFleet, LocalFleet, TelemetryFleet, replay_fleet_4x8
from console.keymap import load_keymap
from engine.core.settings import settings


def default_fleet(workdir: str = ".", clock: Callable[[], float] = time.time,
                  cluster: object | Callable[[], object] | None = None) -> FleetFeed:
    """The fleet feed for a run: remote's live TelemetryMonitor over SSH for a recipe with a [cluster], this
    machine's otherwise. QUANTDECK_FLEET=replay replays recorded nvidia-smi output of a 4×8-GPU fleet.
    `cluster` may be a callable that finds it (called only when needed)."""
    s = settings()
    if s.fleet == "replay":
        return replay_fleet_4x8(interval_s=s.fleet_interval)
    if callable(cluster):
        cluster = cluster()
    try:
        from remote.monitor import TelemetryMonitor  # the live poller (NVML/nvidia-smi, RAM, disk)

        if cluster is not None:
            from remote.hosts import cluster_from

            return TelemetryFleet(TelemetryMonitor.for_cluster(cluster_from(cluster)), interval_s=1.0)
        return TelemetryFleet(TelemetryMonitor.local(workdir), interval_s=1.0)
    except ImportError:
        return LocalFleet(workdir=workdir, clock=clock)


def build_app(run: str | None = None, *, backend: Backend | None = None, fleet: FleetFeed | None = None,
              clock: Callable[[], float] = time.time, follow_s: float = 1.0, workdir: str = ".",
              recipe_hint: str = "", use_fleet: bool = True) -> QuantdeckApp:
    if backend is None:
        from console.api_backend import ApiBackend

        backend = ApiBackend()
    if fleet is None and use_fleet:
        fleet = LazyFleet(lambda: default_fleet(workdir=workdir, clock=clock))
    return QuantdeckApp(backend, fleet, run, clock=clock, follow_s=follow_s, keymap=load_keymap(),
                        recipe_hint=recipe_hint)
