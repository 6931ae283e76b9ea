"""`quantdeck nodes --demo`: the table format, on replayed real recordings."""

from __future__ import annotations

import json

from console.cli import main


def test_demo_table(capsys):
    assert main(["nodes", "--demo"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["NODE", "STATE", "GPU"]
    assert any(line.startswith("node2") and "NVIDIA H100 80GB HBM3" in line and "79.6" in line for line in out)
    assert any(line.startswith("cpu0") and "no GPU" in line for line in out)


def test_demo_json(capsys):
    assert main(["nodes", "--demo", "--json"]) == 0
    data = {d["node"]: d for d in json.loads(capsys.readouterr().out)}
    assert data["node1"]["gpus"][1]["mem_used"] == 13879 << 20 and data["cpu0"]["state"] == "no-gpu"
