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


@pytest.mark.parametrize("args, says", [
    (["--repeat", "0"], "--repeat must be 1 or more"),
    (["--layers", "1"], "--layers must be 2 or more"),
    (["--profile", "prof"], "--profile needs py-spy on PATH (pip install py-spy)"),
])
def test_the_pipeline_benchmark_refuses_bad_options_before_building(args, says, tmp_path):
    """pipeline.py says what is wrong before it builds a source or runs a stage (py-spy off PATH for --profile)."""
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "pipeline.py"), "--workdir", str(tmp_path / "w"),
                        *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={"PATH": str(tmp_path), "HOME": str(tmp_path)})
    assert r.returncode == 2 and says in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())


def test_the_calibration_benchmark_refuses_a_build_the_disks_cannot_hold(tmp_path, monkeypatch):
    """calibrate.py counts a model's bytes before building it: a disk too small for the BF16 model beside its FP8
    cast is refused by name, with the sizes and what to do, and nothing is written."""
    import importlib.util
    import shutil
    from collections import namedtuple

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # as when run as a script (sys.path restored after)
    spec = importlib.util.spec_from_file_location("qd_bench_calibrate", REPO / "benchmarks" / "calibrate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(100 * 10**9, 0, 20 * 10**9))
    with pytest.raises(SystemExit) as e:
        bench.build(tmp_path / "work", "real", 3, 8, 64, "cpu")
    msg = str(e.value)
    assert f"{tmp_path / 'work'} has 20.0 GB free and this build needs 77.1 GB there" in msg
    assert "(BF16 50.9 GB, FP8 26.2 GB): pass --bf16-work on another disk or a tmpfs, or fewer --layers" in msg
    assert not list((tmp_path / "work").iterdir())
