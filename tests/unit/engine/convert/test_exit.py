"""The kernels warm-up thread: a convert that fails within its first second exits with its own error code, not
SIGABRT; CUDA compute waits for the warm-up's compile.

The kernels' warm-up thread (numba loading its cached kernels) can still be in native code when an early error
ends the process; left running while the interpreter tears down, it aborted the process ("terminate called
without an active exception", exit code 134) after the real error was printed, about 1 run in 3.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[4]
EARLY_EXIT = ("import sys; from engine.convert.kernels import warm_up; warm_up('nvfp4', 'cpu'); "
              "sys.stderr.write('quantdeck: error: something early\\n'); sys.exit(3)")


def test_an_error_right_after_the_warm_up_started_exits_with_its_code():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    codes = []
    for _ in range(4):
        p = subprocess.run([sys.executable, "-c", EARLY_EXIT], env=env, capture_output=True, text=True, timeout=120)
        codes.append(p.returncode)
        assert "terminate called" not in p.stderr, p.stderr
    assert codes == [3, 3, 3, 3]


def test_cli_convert_of_a_missing_source_names_it(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "console", "convert", "--src", str(tmp_path / "nope"), "--dst",
                        str(tmp_path / "out"), "--to", "nvfp4"], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 3 and "nope does not exist" in p.stderr and "terminate" not in p.stderr


def test_cuda_compute_waits_for_the_cuda_warm_up_cpu_does_not(monkeypatch):
    """The compute threads of a CUDA run wait for the warm-up's Triton compile instead of compiling beside it."""
    import threading

    from engine.convert import kernels

    release = threading.Event()
    t = threading.Thread(target=release.wait, daemon=True)
    t.start()
    monkeypatch.setattr(kernels, "_WARMING", [("cuda", t)])
    assert kernels._after_cuda_warm_up("cpu") == "cpu" and t.is_alive()  # CPU work does not wait
    threading.Timer(0.3, release.set).start()
    assert kernels._after_cuda_warm_up("cuda:0") == "cuda:0"
    assert not t.is_alive()  # returned only once the warm-up had finished
