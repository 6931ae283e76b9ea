"""Shared fixtures. Each test gets its own QUANTDECK_HOME, so the store and caches never leak between tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(autouse=True)
def _quantdeck_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("qdhome")
    monkeypatch.setenv("QUANTDECK_HOME", str(home))
    monkeypatch.delenv("QUANTDECK_DEBUG", raising=False)
    yield home


@pytest.fixture
def python_exe() -> str:
    return sys.executable


@pytest.fixture
def repo_root() -> Path:
    return REPO


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a child python that imports this checkout, whatever the cwd."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env
