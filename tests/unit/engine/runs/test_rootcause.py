"""Root causes: tracebacks and exit signals → known classes with a one-line hint."""

from __future__ import annotations

import pytest

from engine.core.errors import DiskFullError, SamplesError
from engine.runs.rootcause import classify, last_traceback_line

TB = "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n{}\n"


@pytest.mark.parametrize("line, cls", [
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 31.50 GiB", "cuda-oom"),
    ("RuntimeError: CUDA error: an illegal memory access was encountered", "illegal-memory-access"),
    ("RuntimeError: [Rank 3] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=12)", "nccl-timeout"),
    ("OSError: [Errno 28] No space left on device", "disk-full"),
    ("FileNotFoundError: [Errno 2] No such file or directory: '/x/amax'", "file-missing"),
    ("engine.core.errors.SamplesError: s.json: item 3 is not a string", "bad-samples"),
    ("paramiko.ssh_exception.SSHException: Socket is closed", "ssh-lost"),
    ("MemoryError", "host-oom"),
    ("KeyboardInterrupt: worker received SIGTERM", "interrupted"),
    ("ValueError: something new", "unknown"),
])
def test_traceback_classes(line, cls):
    rc = classify(TB.format(line), exit_code=1)
    assert rc.cls == cls and rc.hint and "\n" not in rc.hint
    if cls == "unknown":
        assert rc.summary == "ValueError: something new"


def test_signals_and_vanished():
    assert classify("", exit_code=-9).cls == "killed"
    assert "SIGKILL" in classify("", exit_code=-9).summary
    assert classify("", exit_code=137).cls == "killed"  # shell convention 128+9
    assert classify("", exit_code=-15).cls == "interrupted"
    assert classify("").cls == "worker-lost"


def test_exceptions():
    assert classify(exc=DiskFullError("no space left writing x")).cls == "disk-full"
    assert classify(exc=SamplesError("bad")).cls == "bad-samples"
    assert classify(exc=KeyboardInterrupt()).cls == "interrupted"
    assert classify(exc=RuntimeError("boom")).summary == "RuntimeError: boom"


def test_last_traceback_line():
    assert last_traceback_line(TB.format("ZeroDivisionError: division by zero") + "trailing chatter") \
        == "ZeroDivisionError: division by zero"


def test_our_errors_keep_their_hint():
    from engine.core.errors import CheckpointError, RunError

    rc = classify(exc=CheckpointError("destination /o already exists", at="/o", hint="pick a new --dst"))
    assert (rc.cls, rc.hint) == ("bad-checkpoint", "pick a new --dst") and "already exists" in rc.summary
    rc = classify(exc=RunError("stage x is odd", hint="do y"))
    assert (rc.cls, rc.hint) == ("error", "do y")
