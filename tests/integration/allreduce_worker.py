"""A stand-in distributed stage for the torchrun-across-nodes test: one gloo all_reduce, recorded per rank.

`torchrun … -m tests.integration.allreduce_worker STAGE --run-dir D` on every node: each rank joins the
process group (gloo), all-reduces its rank + 1, and writes D/stages/STAGE/rank<R>.json with what it saw.
It stands in for engine.runs.worker until a distributed stage (calibrate) exists.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("stage")
    ap.add_argument("--run-dir", required=True)
    a = ap.parse_args()
    import torch
    import torch.distributed as dist

    backend = os.environ.get("QD_TEST_BACKEND", "gloo")  # nccl on a GPU node: one GPU per local rank
    device = "cpu"
    if backend == "nccl":
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    t = torch.tensor([float(rank + 1)], device=device)
    dist.all_reduce(t)
    out = Path(a.run_dir) / "stages" / a.stage / f"rank{rank}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rank": rank, "world": world, "sum": float(t.item()),
                               "node": os.environ.get("QUANTDECK_NODE"), "node_rank": int(os.environ["GROUP_RANK"]),
                               "backend": backend, "device": str(t.device),
                               "gpu": torch.cuda.get_device_name(t.device) if backend == "nccl" else None}))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
