"""Run under torchrun by test_rank_share.py: convert and export the tiny checkpoints with the output shards
split over the ranks (engine.convert.ranks), as `convert_checkpoint` / `export_checkpoint` do in a stage.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/integration/rank_share_worker.py JSON

JSON: {"shard": SIZE, "device": "cpu", "convert": [src, dst], "export": [src, amax, dst]} (either part
optional; device default cpu). Each rank
prints one line {"rank": R, "convert": tensors it wrote, "export": tensors it wrote}.
"""

from __future__ import annotations

import json
import os
import sys

from engine.convert import convert_checkpoint
from engine.core.events import CallbackSink
from engine.export.api import export_checkpoint

LAYOUTS = ("modelopt", "compressed-tensors")


def main() -> int:
    job = json.loads(sys.argv[1])
    done: dict[str, int] = {}
    device = job.get("device", "cpu")

    def counter(what: str) -> CallbackSink:
        def on(ev) -> None:
            if ev.kind == "progress":
                done[what] = max(done.get(what, 0), int(ev.data.get("done") or 0))
        return CallbackSink(on)

    if "convert" in job:
        src, dst = job["convert"]
        convert_checkpoint(src, dst, layouts=LAYOUTS, device=device, shard_size=job["shard"], sink=counter("convert"))
    if "export" in job:
        src, amax, dst = job["export"]
        export_checkpoint(src, amax, dst, layouts=LAYOUTS, device=device, shard_size=job["shard"],
                          sink=counter("export"))
    sys.stdout.write(json.dumps({"rank": int(os.environ.get("RANK", "0")), **done}) + "\n")  # one write per rank
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
