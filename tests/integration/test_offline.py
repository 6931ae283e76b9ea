"""No quantdeck code path reaches a network: the stages that build models (calibrate, export, validate against the
source) run with every outbound connection and name lookup refused, and without the hub variables set by the caller.
quantdeck sets them itself (engine/__init__.py), so transformers neither downloads nor asks for hub kernels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Loaded into every child interpreter through PYTHONPATH: any connection or name lookup that does not stay on this
# machine is written to a file and refused.
GUARD = '''
import os, socket

_LOG = os.environ["QD_TEST_NET_LOG"]
_LOCAL = ("127.", "::1", "localhost", "0.0.0.0")


def _local(addr):
    if isinstance(addr, (str, bytes)):  # AF_UNIX
        return True
    host = str(addr[0]) if addr else ""
    return host.startswith(_LOCAL) or host == ""


def _refuse(what):
    with open(_LOG, "a") as f:
        f.write(what + "\\n")
    raise OSError(101, "network refused by the test guard: " + what)


_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def connect(self, addr):
    if not _local(addr):
        _refuse("connect %r" % (addr,))
    return _connect(self, addr)


def connect_ex(self, addr):
    if not _local(addr):
        _refuse("connect_ex %r" % (addr,))
    return _connect_ex(self, addr)


def getaddrinfo(host, *a, **kw):
    if host is not None and not _local((host,)):
        _refuse("getaddrinfo %r" % (host,))
    return _getaddrinfo(host, *a, **kw)


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
'''

HUB_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "USE_HUB_KERNELS", "HF_DATASETS_OFFLINE")


@pytest.mark.slow
def test_calibrate_export_validate_reach_no_network(tmp_path):
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD)
    log = tmp_path / "net.log"
    env = {k: v for k, v in os.environ.items() if k not in HUB_VARS}
    env.update(QD_TEST_NET_LOG=str(log), PYTHONPATH=os.pathsep.join([str(guard), str(REPO)]),
               HF_HOME=str(tmp_path / "hf-home"))  # an empty hub cache: nothing could come from there either

    def qd(*args: str) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, "-m", "console.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, f"quantdeck {' '.join(args)} failed:\n{r.stderr[-3000:]}"
        return r

    # the guard is live in the children: a lookup of a public name is refused and logged
    probe = subprocess.run([sys.executable, "-c", "import socket; socket.getaddrinfo('huggingface.co', 443)"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "network refused by the test guard" in probe.stderr
    assert log.read_text().strip() == "getaddrinfo 'huggingface.co'"
    log.unlink()

    model, amax, out = tmp_path / "model", tmp_path / "amax", tmp_path / "out"
    qd("fixture", "--family", "deepseek-v3", "--dtype", "fp8", "--out", str(model), "--layers", "2", "--mtp")
    samples = tmp_path / "samples.json"
    samples.write_text(json.dumps([f"sample {i}: the quick brown fox jumps over the lazy dog" for i in range(6)]))
    qd("calibrate", "--model", str(model), "--samples", str(samples), "--out", str(amax), "--seq-len", "16",
       "--batch-size", "2", "--device", "cpu", "--quiet")
    qd("export", "--src", str(model), "--amax", str(amax), "--dst", str(out), "--quiet")
    rep = json.loads(qd("validate", str(out), "--against", str(model), "--json").stdout)
    assert rep["ok"], rep
    assert not log.exists(), f"quantdeck tried to reach the network:\n{log.read_text()}"
