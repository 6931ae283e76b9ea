"""validate's decoder-block check answered by a warm child (engine.convert.block_child.start_warm), in real
processes on a tiny checkpoint: the report is the one validate makes on its own, whether the warm child answers,
is missing, dead, or answers nonsense; the child serves one request, removes its socket, and never lingers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.convert.block_child import SOCKET_PATH_MAX, start_warm
from engine.convert.validate import validate_checkpoint
from engine.core.events import CallbackSink

REPO = Path(__file__).resolve().parents[4]


@pytest.fixture(scope="module")
def pair(tiny_nvfp4):
    src, out = tiny_nvfp4("bf16")
    return src, out, validate_checkpoint(out, against=src)


def _validate(out, src, sock):
    logs: list[str] = []
    sink = CallbackSink(lambda e: logs.append(e.data["msg"]) if e.kind == "log" else None)
    return validate_checkpoint(out, against=src, sink=sink, block_socket=sock), logs

def _warm_fails_the_block_as_cold(tmp_path, out, against, warmed_for) -> None:
    """validate of `out` against `against` fails its block check, and a child warmed up for `warmed_for` answers
    with the very same report."""
    cold = validate_checkpoint(out, against=against)
    assert any(f["check"] == "block" for f in cold["failures"]), cold["failures"]
    warm = start_warm(_sock(tmp_path), warmed_for, "cpu")
    try:
        rep, logs = _validate(out, against, _sock(tmp_path))
        assert rep == cold and any("answered by the warm child" in m for m in logs), logs
    finally:
        warm.stop()



def _sock(tmp_path) -> Path:
    return tmp_path / "block.sock"


def _gone(proc: subprocess.Popen, timeout: float = 60) -> bool:
    try:
        proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def test_the_warm_child_answers_one_request_with_validates_own_report_and_exits(pair, tmp_path):
    src, out, cold = pair
    warm = start_warm(_sock(tmp_path), src, "cpu")
    assert warm is not None and _sock(tmp_path).exists()  # bound before the child runs: validate finds it at once
    try:
        rep, logs = _validate(out, src, _sock(tmp_path))
        assert rep == cold
        assert any(f"answered by the warm child (pid {warm.proc.pid})" in m for m in logs), logs
        assert _gone(warm.proc) and warm.proc.returncode == 0
        assert not _sock(tmp_path).exists()
        rep2, logs2 = _validate(out, src, _sock(tmp_path))  # one request only: the next validate runs its own
        assert rep2 == cold and not any("warm child" in m for m in logs2), logs2
    finally:
        warm.stop()


def test_a_failing_layer_fails_the_same_through_the_warm_child(pair, tmp_path):
    from engine.checkpoint import CheckpointReader, write_checkpoint

    src, out, _ = pair
    r = CheckpointReader(out)
    t = {n: r.get(n).clone() for n in r.names()}
    down = "model.layers.0.mlp.down_proj"  # packed rows swapped: every scale valid, only the layer's math differs
    t[down + ".weight"] = t[down + ".weight"].flip(0).contiguous()
    t[down + ".weight_scale"] = t[down + ".weight_scale"].flip(0).contiguous()
    bad = tmp_path / "bad"
    write_checkpoint(bad, t)
    (bad / "manifest.json").unlink()
    for f in ("config.json", "hf_quant_config.json"):
        (bad / f).write_text((out / f).read_text())
    _warm_fails_the_block_as_cold(tmp_path, bad, src, warmed_for=src)


def test_no_socket_runs_the_check_as_without_and_says_nothing(pair, tmp_path):
    src, out, cold = pair
    rep, logs = _validate(out, src, _sock(tmp_path))
    assert rep == cold and not any("warm child" in m for m in logs), logs


def test_a_dead_warm_child_falls_back_and_says_so(pair, tmp_path):
    src, out, cold = pair
    warm = start_warm(_sock(tmp_path), src, "cpu")
    warm.proc.kill()  # as the OOM killer would: its socket stays behind, nobody listens
    warm.proc.wait()
    assert _sock(tmp_path).exists()
    rep, logs = _validate(out, src, _sock(tmp_path))
    assert rep == cold
    assert any("no warm child at" in m and "running the check in a new child" in m for m in logs), logs
    warm.stop()
    assert not _sock(tmp_path).exists()


@pytest.mark.parametrize("answer", [b"", b"not json\n", b'{"calls": [["__init__", "x"]]}\n',
                                    b'{"error": "Traceback ...\\nMemoryError"}\n'])
def test_a_warm_child_that_dies_or_answers_nonsense_falls_back(pair, tmp_path, answer):
    """After the request went out: the child closes without a line, or answers what is no report."""
    src, out, cold = pair
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(_sock(tmp_path)))
    lsock.listen(1)

    def serve():
        conn, _ = lsock.accept()
        with conn:
            conn.makefile("rb").readline()
            conn.sendall(answer)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        rep, logs = _validate(out, src, _sock(tmp_path))
    finally:
        t.join(10)
        lsock.close()
    assert rep == cold
    assert any("the warm child gave no answer" in m for m in logs), logs


def test_the_warm_child_serves_another_source_too(pair, tiny_ckpt, tmp_path):
    """Warmed up for one source, asked about another: it runs the whole check (no source half reused)."""
    src, out, _ = pair
    other = tiny_ckpt("deepseek-v3", "bf16", seed=1)  # same shapes, other weights: layer 0 differs
    _warm_fails_the_block_as_cold(tmp_path, out, other, warmed_for=src)


def test_an_idle_warm_child_exits_and_removes_its_socket(tiny_ckpt, tmp_path):
    warm = start_warm(_sock(tmp_path), tiny_ckpt("deepseek-v3", "bf16"), "cpu", idle_s=0.5)
    assert _gone(warm.proc) and warm.proc.returncode == 0
    assert not _sock(tmp_path).exists()


def test_the_warm_child_dies_with_its_parent(tiny_ckpt, tmp_path):
    """The driver killed with -9: its warm child goes at once, not after its idle time."""
    code = ("import sys, time; from engine.convert.block_child import start_warm; "
            "w = start_warm(sys.argv[1], sys.argv[2], 'cpu'); print(w.proc.pid, flush=True); time.sleep(120)")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    mid = subprocess.Popen([sys.executable, "-c", code, str(_sock(tmp_path)), str(tiny_ckpt("deepseek-v3", "bf16"))],
                           stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    child = int(mid.stdout.readline())
    os.kill(mid.pid, signal.SIGKILL)
    mid.wait()
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        stat = Path(f"/proc/{child}/stat").read_text() if Path(f"/proc/{child}/stat").exists() else ""
        if stat and stat[stat.rfind(")") + 2] in "ZX":
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail(f"warm child {child} outlived its parent")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reaches long paths through /proc/self/fd")
def test_a_socket_path_longer_than_a_socket_address_still_works(pair, tmp_path):
    src, out, cold = pair
    deep = tmp_path / ("d" * (SOCKET_PATH_MAX - len(str(tmp_path))))
    deep.mkdir()
    assert len(str(deep / "block.sock")) > SOCKET_PATH_MAX
    warm = start_warm(deep / "block.sock", src, "cpu")
    try:
        assert (deep / "block.sock").exists()
        rep, logs = _validate(out, src, deep / "block.sock")
        assert rep == cold and any("answered by the warm child" in m for m in logs), logs
    finally:
        warm.stop()


def test_a_warm_source_side_reads_the_source_only_when_asked(pair, monkeypatch):
    """What a warm child does before validate asks (`source_side(..., run=False)`) reads none of the source's
    tensors, so that beside a conversion it leaves the disk to it; run when asked (`run_source`, once), it gives the
    very layer-0 output the check computes in one go."""
    import torch

    from engine.checkpoint.reader import CheckpointReader
    from engine.convert.block_check import run_source, source_side

    src, _, _ = pair
    whole = source_side(CheckpointReader(src), "cpu")
    read: list[str] = []
    orig = CheckpointReader._read_into
    monkeypatch.setattr(CheckpointReader, "_read_into", lambda self, m, view: (read.append(m.shard),
                                                                                orig(self, m, view))[1])
    r = CheckpointReader(src)
    side = source_side(r, "cpu", run=False)
    assert side.skip is None and side.d_src is None and not read
    ran = run_source(side, r)
    assert read and torch.equal(ran.d_src, whole.d_src)
    read.clear()
    assert run_source(ran, r) is ran and not read
