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
