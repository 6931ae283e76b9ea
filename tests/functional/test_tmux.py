"""`quantdeck console RUN` in a real terminal (tmux), read with capture-pane, driven with send-keys — as a person
would. The run is the session's real (killed-export) run; the console must show it, open history and quit
without touching the run."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
import uuid

import pytest
from conftest_paths import REPO

pytestmark = pytest.mark.slow


class Tmux:
    def __init__(self, width: int = 120, height: int = 40):
        self.sock = f"qd-{uuid.uuid4().hex[:8]}"
        self.name = "console"
        self.size = (width, height)

    def _tmux(self, *args: str, check: bool = True) -> str:
        res = subprocess.run(["tmux", "-L", self.sock, *args], capture_output=True, text=True, timeout=20)
        if check and res.returncode != 0:
            raise RuntimeError(res.stderr)
        return res.stdout

    def start(self, command: str) -> None:
        w, h = self.size
        self._tmux("new-session", "-d", "-s", self.name, "-x", str(w), "-y", str(h), command)
        self._tmux("resize-window", "-t", self.name, "-x", str(w), "-y", str(h), check=False)

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", self.name, check=False)

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", self.name, *keys)

    def wait_for(self, text: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if text in screen:
                return screen
            time.sleep(0.2)
        raise AssertionError(f"{text!r} never appeared on the screen:\n{screen}")

    def wait_for_all(self, *texts: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if all(t in screen for t in texts):
                return screen
            time.sleep(0.2)
        raise AssertionError(f"{[t for t in texts if t not in screen]!r} never appeared on the screen:\n{screen}")

    def kill(self) -> None:
        self._tmux("kill-server", check=False)


def console_command(real, extra: str = "") -> str:
    env = {"QUANTDECK_HOME": str(real.home), "QUANTDECK_WORKDIR": str(real.workdir), "PYTHONPATH": str(REPO),
           "TERM": "xterm-256color", "COLORTERM": "truecolor"}
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    return (f"cd {shlex.quote(str(REPO))} && env {exports} {shlex.quote(sys.executable)} -m console.cli console "
            f"{extra} {real.run_id}; echo CONSOLE-EXITED $?; sleep 30")


@pytest.fixture
def tmux():
    if shutil.which("tmux") is None:
        pytest.fail("tmux is needed (apt-get install -y tmux; .ci/run installs it)")
    t = Tmux()
    yield t
    t.kill()


def test_console_in_tmux_shows_the_run_opens_history_and_quits(real_env, tmux):
    real = real_env
    tmux.start(console_command(real))
    tmux.wait_for(f"run {real.run_id}", timeout=40)
    screen = tmux.wait_for("calibration")  # the whole frame: a resize at start may draw it in two writes
    for stage in ("inspect", "calibrate", "export", "validate"):
        assert stage in screen
    assert "fleet" in screen and "calibration" in screen and "quality" in screen
    tmux.keys("h")
    # the count is drawn before the table's rows: wait for the run's row too
    screen = tmux.wait_for_all("1 run ·", real.run_id)
    assert "model" in screen
    tmux.keys("Enter")
    # the attempts table with the SIGKILLed export attempt (the header may name the kill, and the table's own
    # header show, before its rows are drawn)
    tmux.wait_for_all("export", "FAILED_WORKER", "killed")  # the fix note is edited in test_console_actions
    tmux.keys("Escape")
    tmux.wait_for("1 run ·")
    tmux.keys("Escape")
    tmux.wait_for("calibration")
    tmux.keys("q")
    screen = tmux.wait_for("CONSOLE-EXITED", timeout=20)
    assert "CONSOLE-EXITED 0" in screen
    assert "left the console" in screen
    if real.engine().status(real.run_id).driver_alive:  # after the resume test: the run went on without it
        assert "goes on without it" in screen
