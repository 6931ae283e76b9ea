"""A stand-in stage process for the follow-across-reconnect test: emits numbered progress events.

`python -m tests.integration.ticker_worker STAGE --run-dir D --count N --interval S` writes N progress
events (done = 1..N) to D/stages/STAGE/events.jsonl through engine.core.events.JsonlSink, one every S seconds,
then a SUCCEEDED state event. It is started through the real SSH launcher on a real sshd node; it only
stands in for a stage long enough to outlive an sshd restart.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from engine.core.events import JsonlSink


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("stage")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--count", type=int, default=50)
    ap.add_argument("--interval", type=float, default=0.05)
    a = ap.parse_args()
    sink = JsonlSink(Path(a.run_dir) / "stages" / a.stage / "events.jsonl", stage=a.stage,
                     host=os.environ.get("QUANTDECK_NODE", "?"))
    sink.emit("state", state="RUNNING", pid=os.getpid())
    for i in range(1, a.count + 1):
        time.sleep(a.interval)
        sink.emit("progress", unit="ticks", done=i, total=a.count)
    sink.emit("state", state="SUCCEEDED")
    print("ticker done", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
