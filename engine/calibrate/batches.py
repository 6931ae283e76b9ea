"""Which samples each rank calibrates, in which batches: contiguous rank shares, right-padded batches.

The split is a pure function of (token ids, batch size, world size, rank), so a reference run (or a
resumed run) rebuilds exactly the same batches.
"""

from __future__ import annotations

import torch

from engine.calibrate.family import Batch


def rank_share(n: int, world_size: int, rank: int) -> range:
    """Contiguous share of n samples for `rank` (the first n % world ranks get one more)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def plan_batches(input_ids: list[list[int]], batch_size: int, world_size: int = 1, rank: int = 0,
                 pad_id: int = 0) -> list[Batch]:
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    mine = [input_ids[j] for j in rank_share(len(input_ids), world_size, rank)]
    out = []
    for k in range(0, len(mine), batch_size):
        group = mine[k:k + batch_size]
        width = max(len(s) for s in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for r, s in enumerate(group):
            ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[r, :len(s)] = 1
        out.append(Batch(ids, mask))
    return out
