"""A run on its own machine writes through the page cache and syncs behind the next stage
(engine.runs.durability): every stage ends recorded `synced` under this machine's boot. A resume after a
reboot that came before a sync does that stage and the ones after it again, and a shard torn by the reboot is
found by its digest and rewritten: the output ends byte-identical. Real processes: the `quantdeck` CLI, its
driver and workers; the reboot is QUANTDECK_BOOT_ID (engine.core.settings) and a status put back to before
its sync."""

from __future__ import annotations

import json

import pytest

from engine.core.fsutil import boot_id
from tests.integration.runs_support import qd, run_dir, run_id_of, status, tree_digest, write_recipe

STAGES = ["inspect", "convert", "inject-mtp", "copy-extras", "validate"]


def _unsync(work, rid, stage):
    p = run_dir(work, rid) / "stages" / stage / "status.json"
    st = json.loads(p.read_text())
    st["synced"] = False
    p.write_text(json.dumps(st))


@pytest.mark.slow
def test_stages_sync_behind_the_run_and_a_reboot_before_a_sync_redoes_them(tmp_path, tiny_ckpt, monkeypatch):
    monkeypatch.delenv("QUANTDECK_FSYNC", raising=False)
    src = tiny_ckpt("deepseek-v3", "fp8", mtp=True)
    work, out = tmp_path / "work", tmp_path / "out"
    recipe = write_recipe(tmp_path / "recipe.toml", src, work, out)
    r = qd("run", str(recipe))
    assert r.returncode == 0 and "SUCCEEDED" in r.stderr, r.stderr
    rid = run_id_of(r)
    for stage in STAGES:
        st = status(work, rid, stage)
        assert (st["state"], st["synced"], st["boot"], st["attempt"]) == ("SUCCEEDED", True, boot_id(), 1), stage
    assert json.loads((run_dir(work, rid) / "run.json").read_text())["sync_wait_s"] >= 0  # the run's end waited
    man = json.loads((out / "manifest.json").read_text())
    assert {rec["synced"] for rec in man["shards"].values()} == {False}  # through the page cache, no fsync
    before = tree_digest(out)

    _unsync(work, rid, "convert")  # the same machine: the page cache still holds it, nothing is done again
    r = qd("resume", rid)
    assert r.returncode == 1 and "nothing left to do" in r.stderr, r.stderr
    assert [status(work, rid, s)["attempt"] for s in STAGES] == [1, 1, 1, 1, 1]

    for stage in STAGES[1:]:  # the machine went down before convert's sync: one shard lost a page
        _unsync(work, rid, stage)
    torn = sorted(out.glob("model-*.safetensors"))[0]
    data = bytearray(torn.read_bytes())
    data[-5] ^= 0xFF
    torn.write_bytes(bytes(data))
    r = qd("resume", rid, QUANTDECK_BOOT_ID="another-boot")
    assert r.returncode == 0, r.stderr
    log = (run_dir(work, rid) / "driver.log").read_text() if (run_dir(work, rid) / "driver.log").exists() else ""
    assert "rebooted before what convert wrote was synced" in r.stderr + log
    assert [status(work, rid, s)["attempt"] for s in STAGES] == [1, 2, 2, 2, 2]
    assert all(status(work, rid, s)["synced"] is True for s in STAGES)
    assert status(work, rid, "convert")["boot"] == "another-boot"
    assert tree_digest(out) == before
