"""A rank that never joins a collective: `torchrun --nproc-per-node 2 -m tests.integration.hang_rank_worker OUT`.

Both ranks join the process group through engine.calibrate.dist.init_distributed (its timeout from
QUANTDECK_COLLECTIVE_TIMEOUT_S, as engine.runs.worker hands on `[run] stall_after_s`); rank 1 then sleeps far past that
timeout, while rank 0 all-reduces on a group made after the default one (as the layer reader's node group is).
Rank 0 writes OUT/rank0.json: the root cause (engine.runs.rootcause) of the error it got, and how long it waited."""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path


def main() -> int:
    import torch
    import torch.distributed as dist

    from engine.calibrate.dist import init_distributed
    from engine.runs.rootcause import classify

    out = Path(sys.argv[1])
    ctx = init_distributed("cpu")
    group = dist.new_group(backend="gloo")
    if ctx.rank == 1:
        time.sleep(120)  # never joins: torchrun stops it once rank 0 fails
        return 0
    t0 = time.monotonic()
    try:
        dist.all_reduce(torch.ones(4), group=group)
        result = {"error_class": None}
    except Exception as e:  # noqa: BLE001 - what the worker would classify
        cause = classify(traceback.format_exc(), exc=e)
        result = {"error_class": cause.cls, "error": cause.summary, "hint": cause.hint}
    result["waited_s"] = time.monotonic() - t0
    (out / "rank0.json").write_text(json.dumps(result))
    return 1


if __name__ == "__main__":
    sys.exit(main())
