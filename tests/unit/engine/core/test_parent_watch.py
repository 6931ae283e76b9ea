"""engine.core.parent_watch: a child dies with its parent, in real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from tests.conftest import subprocess_env

# A middle process that starts a child, which arms die_with_parent and sleeps; the middle prints the child's pid.
MIDDLE = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
                          "import os, time; from engine.core.parent_watch import die_with_parent; "
                          "die_with_parent(os.getppid()); time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


def test_a_child_dies_with_its_parent():
    middle = subprocess.Popen([sys.executable, "-c", MIDDLE], env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(middle.stdout.readline()))
    time.sleep(1.0)  # the child has imported and armed itself
    assert child.is_running() and child.status() != psutil.STATUS_ZOMBIE
    os.kill(middle.pid, signal.SIGKILL)
    middle.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    else:
        child.kill()
        raise AssertionError("the child outlived its parent")


def test_a_parent_gone_before_arming_is_noticed():
    """The parent died between the child's start and its prctl call: no signal would come, the ppid check kills."""
    code = "from engine.core.parent_watch import die_with_parent; die_with_parent(-1); print('alive')"
    res = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == -signal.SIGKILL and "alive" not in res.stdout
