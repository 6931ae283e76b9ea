"""StageFollower: offsets only advance past complete lines; a lost connection loses and repeats nothing."""

from __future__ import annotations

import json

from engine.core.errors import RemoteError
from engine.core.events import JsonlSink
from remote.follow import StageFollower


class FlakyReader:
    """Reads local files like SFTP would, and can be 'disconnected'."""

    def __init__(self):
        self.down = False

    def __call__(self, path, offset=0):
        if self.down:
            raise RemoteError("node1: connection lost", at="node1")
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                return fh.read()
        except FileNotFoundError:
            return b""


def test_follow_across_a_drop_and_a_torn_line(tmp_path):
    stage = tmp_path / "stages" / "convert"
    sink = JsonlSink(stage / "events.jsonl", stage="convert")
    read = FlakyReader()
    f = StageFollower(read, str(stage))
    assert f.poll().events == []  # nothing yet: fine
    for i in range(3):
        sink.emit("progress", done=i)
    (stage / "status.json").write_text(json.dumps({"state": "RUNNING"}))
    up = f.poll()
    assert [e.data["done"] for e in up.events] == [0, 1, 2] and up.status["state"] == "RUNNING"
    read.down = True
    for i in range(3, 6):
        sink.emit("progress", done=i)
    up = f.poll()
    assert not up.connected and up.events == [] and up.status["state"] == "RUNNING" and "node1" in up.error
    with open(stage / "events.jsonl", "a") as fh:
        fh.write('{"kind": "progress", "done": 6')  # a line being written
    read.down = False
    up = f.poll()
    assert [e.data["done"] for e in up.events] == [3, 4, 5] and f.reconnects == 1
    with open(stage / "events.jsonl", "a") as fh:
        fh.write(', "v": 1}\n')
    assert [e.data["done"] for e in f.poll().events] == [6]


def test_log_tail_by_lines(tmp_path):
    stage = tmp_path / "s"
    stage.mkdir()
    (stage / "log.txt").write_text("a\nb\npartial")
    f = StageFollower(FlakyReader(), str(stage))
    assert f.poll().log == "a\nb\n"
    with open(stage / "log.txt", "a") as fh:
        fh.write(" line\n")
    assert f.poll().log == "partial line\n"
