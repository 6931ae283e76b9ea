"""The inspect and inject-mtp stages import no torch: each runs in its own worker process, and torch's import
(a second or more) would be most of their wall. Run in a fresh interpreter, as the worker runs them."""

from __future__ import annotations

import json
import subprocess
import sys

from engine.checkpoint import CheckpointReader, write_checkpoint
from engine.convert import copy_extras

CHILD = """
import json, sys
from pathlib import Path
from engine.runs.worker import load_stage_class
from engine.stages.base import StageContext

src, out, run_dir = (Path(a) for a in sys.argv[1:4])
res = {}
for stage, params in (("inspect", {"model": str(src), "report": str(run_dir / "report.json"), "family": None}),
                      ("inject-mtp", {"src": str(src), "dst": str(out), "layouts": ["modelopt"]})):
    ctx = StageContext(run_dir=run_dir, stage_dir=run_dir / stage, params=params)
    res[stage] = load_stage_class(stage)().run(ctx)
print(json.dumps({"torch": "torch" in sys.modules, "res": res}, default=str))
"""


def test_inspect_and_inject_mtp_stages_import_no_torch(tiny_ckpt, tmp_path):
    src = tiny_ckpt("deepseek-v3", "bf16", mtp=True)
    r = CheckpointReader(src)
    n = r.config["num_hidden_layers"]
    drop = {f"model.layers.{n}.embed_tokens.weight": "model.embed_tokens.weight",
            f"model.layers.{n}.shared_head.head.weight": "lm_head.weight"}
    out = tmp_path / "out"  # a converted output that lacks the MTP layer's embedding/head copies
    write_checkpoint(out, {k: r.get_host(k) for k in r.names() if k not in drop})
    copy_extras(src, out)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    p = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), str(run_dir)], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout.splitlines()[-1])
    assert got["res"]["inspect"]["family"] == "deepseek-v3"
    assert sorted(got["res"]["inject-mtp"][str(out)]["injected"]) == sorted(drop)
    assert got["torch"] is False
    o = CheckpointReader(out)  # the injected copies are the stored bytes of the shared tensors
    for new, shared in drop.items():
        assert o.meta(new).dtype_name == r.meta(shared).dtype_name
        assert o.get_host(new).raw().tobytes() == r.get_host(shared).raw().tobytes()
