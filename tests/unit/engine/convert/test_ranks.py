"""engine.convert.ranks without torchrun (one rank: nothing changes), and which plans split the shards."""

from __future__ import annotations

import pytest

from engine.convert.ranks import Ranks, over_ranks
from engine.runs.plan import build_plan
from engine.runs.recipe import loads_recipe


def test_one_rank_is_a_no_op(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    seen = []

    @over_ranks
    def job(x, ranks=None):
        seen.append(ranks)
        return x + 1

    assert job(1) == 2
    r = seen[0]
    assert (r.rank, r.world, r.active, r.head, r.store) == (0, 1, False, True, None)
    assert r.share([1, 2, 3]) == [1, 2, 3] and r.sync("x") == ["x"]


def test_share_is_round_robin():
    r = Ranks(rank=1, world=3)
    assert r.share(list(range(8))) == [1, 4, 7]


NODES = "".join(f'[[cluster.nodes]]\nname = "n{i}"\nhost = "h{i}"\n' for i in range(2))


@pytest.mark.parametrize("cluster, spread", [
    ("", False),
    ("[cluster]\ngpus_per_node = 1\n", False),
    ("[cluster]\ngpus_per_node = 2\n", True),  # two local ranks
    ('[cluster]\n[[cluster.nodes]]\nname = "n0"\nhost = "h0"\ngpus = 8\n', True),  # one node, 8 GPUs
    ('[cluster]\n[[cluster.nodes]]\nname = "n0"\nhost = "h0"\n', False),
    ("[cluster]\n" + NODES, True),
])
def test_shard_writing_stages_are_distributed_with_several_ranks(cluster, spread):
    for target, stages in (('format = "nvfp4"', ["convert"]), ('format = "bf16"', ["dequant"]),
                           ('format = "fp8-block"', ["cast-fp8"]), ("calibrate = true", ["export"])):
        r = loads_recipe(f'[run]\nworkdir = "w"\n[source]\npath = "/m"\n[target]\n{target}\n'
                         f'[calibration]\nsamples = "s.json"\n{cluster}')
        p = build_plan(r, run_id="r", run_dir="/w/runs/r", base="/")
        for name in stages:
            sp = p.stage(name)
            assert sp.distributed is spread, (cluster, name)
            assert sp.nodes == (tuple(n.name for n in r.cluster.nodes) if spread else ())
        assert not p.stage("inject-mtp").distributed
