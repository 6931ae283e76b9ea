"""The plan of a sharded checkpoint: which tensors go in which shard file, decided before any data exists
(engine.checkpoint.writer writes the shards of a plan)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from engine.checkpoint.safetensors_format import TensorSpec


@dataclass(frozen=True)
class ShardPlan:
    """One output shard: its file name and every tensor it will hold."""

    name: str
    tensors: tuple[TensorSpec, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def plan_shards(units: Iterable[list[TensorSpec]], shard_size: int) -> list[ShardPlan]:
    """Fill shards greedily in the given order; a unit (e.g. one fused group) is never split."""
    groups: list[list[TensorSpec]] = []
    cur: list[TensorSpec] = []
    cur_bytes = 0
    for unit in units:
        size = sum(t.nbytes for t in unit)
        if cur and cur_bytes + size > shard_size:
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.extend(unit)
        cur_bytes += size
    if cur or not groups:
        groups.append(cur)
    n = len(groups)
    return [ShardPlan(shard_name(i + 1, n), tuple(g)) for i, g in enumerate(groups)]
