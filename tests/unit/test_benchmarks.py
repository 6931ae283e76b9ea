"""Each benchmark runs as a user runs it (`python benchmarks/NAME.py`), and none shadows an installed package:
a script's own folder comes first on sys.path, so a `benchmarks/kernels.py` once hid the `kernels` package that
transformers imports."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("_"))


def test_no_benchmark_module_has_the_name_of_an_installed_package():
    installed = set(md.packages_distributions())
    clash = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if p.stem in installed)
    assert not clash, f"benchmarks/ modules shadow installed packages when run as scripts: {clash}"
    assert "kernels" in installed  # the package that once was shadowed is there to be shadowed


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_each_benchmark_answers_help_run_as_a_script(script, tmp_path):
    r = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.lstrip().startswith("usage:"), r.stdout[:500]
