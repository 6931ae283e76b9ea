"""Console functional tests: frozen cursor blink, a fixed clock, replayed telemetry, real runs via engine.api."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _no_blink(monkeypatch):
    """Snapshots and Pilot tests never depend on where a cursor blink happens to be."""
    from textual.widgets import Input

    monkeypatch.setattr(Input, "cursor_blink", False)
    monkeypatch.delenv("QUANTDECK_FLEET", raising=False)


@pytest.fixture
def fixed_clock():
    from static_backend import T0

    return lambda: T0


@pytest.fixture(scope="session")
def killed_run(tmp_path_factory):
    """One real calibrated run per session whose export worker was SIGKILLed (see real_run.py)."""
    from real_run import env, make_killed_run

    from engine.fixtures import build_fixture

    root = tmp_path_factory.mktemp("console_run")
    ckpt = build_fixture(root / "ckpt", family="deepseek-v3", dtype="fp8", layers=2, experts=4, hidden=128,
                         moe_inter=64, mtp=True)
    run = make_killed_run(root, ckpt)
    yield run
    with env(QUANTDECK_HOME=str(run.home), QUANTDECK_WORKDIR=str(run.workdir)):
        eng = run.engine()
        if eng.status(run.run_id).driver_alive:
            eng.cancel(run.run_id)  # never leave a run behind


@pytest.fixture
def real_env(killed_run, monkeypatch):
    monkeypatch.setenv("QUANTDECK_HOME", str(killed_run.home))
    monkeypatch.setenv("QUANTDECK_WORKDIR", str(killed_run.workdir))
    return killed_run
