"""modelopt imported without the plugins of libraries a calibration does not use: a library installed on the
machine (here stand-ins that record their import) is not imported with modelopt, and stays importable after."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.calibrate.modelopt_import import UNUSED_PLUGIN_LIBRARIES

ROOT = Path(__file__).resolve().parents[4]
STAND_INS = ("torch_geometric", "vllm", "transformer_engine")

SCRIPT = """
import json, sys
if sys.argv[1] == "quantdeck":
    from engine.calibrate.modelopt_import import quantization
    mtq = quantization()
else:
    import modelopt.torch.quantization as mtq
from engine.calibrate import expert_store
seen = open(sys.argv[2]).read().split()
for name in sys.argv[3:]:
    __import__(name)
print(json.dumps({"with_modelopt": seen, "after": open(sys.argv[2]).read().split(),
                  "preset": "NVFP4_DEFAULT_CFG" in dir(mtq), "fused_experts": expert_store.supported()}))
"""


def _run(how: str, tmp_path: Path) -> dict:
    lib, marker = tmp_path / "site", tmp_path / "imported.txt"
    lib.mkdir(parents=True)
    marker.write_text("")
    for name in STAND_INS:
        (lib / name).mkdir(parents=True, exist_ok=True)
        (lib / name / "__init__.py").write_text(f"open({str(marker)!r}, 'a').write({name!r} + '\\n')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(lib), str(ROOT)]))
    r = subprocess.run([sys.executable, "-c", SCRIPT, how, str(marker), *STAND_INS], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_stand_ins_are_what_modelopt_would_import():
    assert set(STAND_INS) <= set(UNUSED_PLUGIN_LIBRARIES)


def test_no_hidden_library_is_one_transformers_keeps_a_record_of():
    """transformers caches whether some libraries are installed (`is_peft_available`, ...): hidden while it first
    asked, such a library would stay absent for it after; none of those is hidden."""
    from transformers.utils import import_utils

    assert [n for n in UNUSED_PLUGIN_LIBRARIES if hasattr(import_utils, f"is_{n}_available")] == []
    assert all(hasattr(import_utils, f"is_{n}_available") for n in ("peft", "diffusers", "apex"))


@pytest.mark.slow
def test_modelopt_comes_without_unused_plugins_and_they_stay_importable(tmp_path):
    plain = _run("modelopt", tmp_path / "plain")
    assert set(plain["with_modelopt"]) == set(STAND_INS)  # modelopt alone imports every one of them

    mine = _run("quantdeck", tmp_path / "quantdeck")
    assert mine["with_modelopt"] == []
    assert sorted(mine["after"]) == sorted(STAND_INS)  # importable again once modelopt is in
    assert mine["preset"] and mine["fused_experts"] == plain["fused_experts"] is True
