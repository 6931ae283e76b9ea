"""The package boundaries (engine never imports the UI or SSH; console never imports torch), checked in fresh
interpreters."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _modules(pkg: str) -> list[str]:
    mods = [pkg]
    for m in pkgutil.walk_packages([str(REPO / pkg)], prefix=f"{pkg}."):
        if not m.name.endswith("__main__"):
            mods.append(m.name)
    return mods


def _loaded_after_import(modules: list[str]) -> dict[str, list[str]]:
    code = (
        "import importlib, json, sys\n"
        f"mods = {modules!r}\n"
        "out = {}\n"
        "base = set(sys.modules)\n"
        "for m in mods:\n"
        "    importlib.import_module(m)\n"
        "out = sorted(sys.modules)\n"
        "print(json.dumps(out))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def _roots(names: list[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


def test_engine_never_imports_ui_ssh_or_remote():
    loaded = _roots(_loaded_after_import(_modules("engine")))
    forbidden = loaded & {"textual", "paramiko", "remote", "console", "rich"}
    assert not forbidden, forbidden


def test_remote_never_imports_ui():
    loaded = _roots(_loaded_after_import(_modules("remote")))
    assert not loaded & {"textual", "console"}


def test_importing_console_does_not_import_torch():
    loaded = _roots(_loaded_after_import(["console", "console.cli"]))
    assert "torch" not in loaded
    assert "transformers" not in loaded


def test_import_linter_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.fail("import-linter is a test dependency: pip install -e '.[test]'")
    res = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
