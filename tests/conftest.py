"""Shared fixtures. Each test gets its own QUANTDECK_HOME, so the store and caches never leak between tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

import engine  # noqa: E402,F401  (sets the offline variables before any test imports transformers)
from tests.fixtures_ckpt import tiny_ckpt  # noqa: F401  (registers the session fixture for every test)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(autouse=True)
def _quantdeck_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("qdhome")
    monkeypatch.setenv("QUANTDECK_HOME", str(home))
    monkeypatch.setenv("QUANTDECK_START_FILES", str(home / "start-files"))  # engine.startup.startfiles: per test
    monkeypatch.delenv("QUANTDECK_DEBUG", raising=False)
    yield home


@pytest.fixture(params=["c", "numba"])
def cpu_kernels(request, monkeypatch):
    """Run a test with each CPU kernel technology (engine.formats.cpu_kernels): the C kernels (built here: CI has
    a compiler, QUANTDECK_KERNELS=c refuses to fall back) and the numba ones."""
    monkeypatch.setenv("QUANTDECK_KERNELS", request.param)
    yield request.param


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


@pytest.fixture
def make_unwritable() -> Iterator[Callable[[Path], Path]]:
    """Factory: `make_unwritable(dir)` makes an existing directory unwritable for this process, for real (its
    contents stay readable): a read-only bind mount (EROFS) as root, whom mode bits do not stop, else mode 0555
    (EACCES). Undone after the test."""
    undo: list[Callable[[], object]] = []

    def make(path: Path) -> Path:
        if os.geteuid() != 0:
            mode = path.stat().st_mode
            path.chmod(0o555)
            undo.append(lambda: path.chmod(mode))
            return path
        if subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode:
            pytest.skip("running as root without the right to mount: no way to make a directory unwritable")
        undo.append(lambda: subprocess.run(["umount", str(path)], check=True))
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path), str(path)], check=True, capture_output=True)
        return path

    yield make
    for fn in reversed(undo):
        fn()
