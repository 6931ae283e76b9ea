"""end_process: what was printed reaches the pipes whole, the code is kept, and the teardown is skipped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]

SCRIPT = """
import atexit, sys
from engine.core.procexit import end_process
atexit.register(lambda: print("teardown ran"))
sys.stdout.write("out\\n" * 20000)  # a pipe: block-buffered, most of it still in the buffer
sys.stderr.write("err line")  # no newline
end_process(3)
print("not reached")
"""


def test_output_flushed_code_kept_teardown_skipped():
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 3
    assert r.stdout == "out\n" * 20000
    assert r.stderr == "err line"
