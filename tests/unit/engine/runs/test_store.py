"""The store: WAL, additive migrations, parameterized upserts, rebuild from run dirs, no credentials."""

from __future__ import annotations

import os
import sqlite3

from engine.core.names import StageState as S
from engine.runs.rundir import begin_attempt, create_run_dir, set_running, set_status
from engine.runs.store import AttemptRecord, RunRecord, Store, rescan, scrub, sync_run


def test_store_lives_in_quantdeck_home(_quantdeck_home):
    with Store() as st:
        assert st.path == _quantdeck_home / "store.db"
        assert st.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_additive_migration_keeps_old_rows(tmp_path):
    db = tmp_path / "old.db"
    c = sqlite3.connect(db)
    c.execute("CREATE TABLE runs (id TEXT PRIMARY KEY, created REAL, run_dir TEXT, recipe_path TEXT, recipe_hash TEXT,"
              " git_commit TEXT, model TEXT, target TEXT, calib_size INTEGER, result TEXT, root_cause TEXT,"
              " fix_note TEXT)")
    c.execute("INSERT INTO runs (id, model, fix_note) VALUES ('old', 'V3', 'use bf16')")
    c.commit()
    c.close()
    with Store(db) as st:
        r = st.run("old")
        assert r.model == "V3" and r.fix_note == "use bf16" and r.root_hint is None


def test_upsert_is_parameterized_and_keeps_note(tmp_path):
    with Store(tmp_path / "s.db") as st:
        evil = "x'); DROP TABLE runs; --"
        st.upsert_run(RunRecord(id="r1", model=evil, result="FAILED"))
        st.set_note("r1", "lower batch size")
        st.upsert_run(RunRecord(id="r1", model=evil, result="SUCCEEDED"))
        r = st.run("r1")
        assert r.model == evil and r.result == "SUCCEEDED" and r.fix_note == "lower batch size"
        st.upsert_attempt(AttemptRecord(run_id="r1", stage="convert", attempt=1, state="FAILED",
                                        error_text="boto: aws_secret_access_key=AKIASECRET123 denied"))
        a = st.attempts("r1")[0]
        assert "AKIASECRET123" not in a.error_text and "***" in a.error_text


def test_scrub():
    assert scrub("password: hunter2 ok") == "password: *** ok"
    assert scrub(None) is None


def test_rebuild_from_run_dirs(tmp_path):
    run = create_run_dir(tmp_path / "work")
    run.plan_path.write_text('{"run_id": "%s", "created": 5.0, "stages": [{"name": "inspect"}, {"name": "convert"}]}'
                             % run.id)
    run.meta_path.write_text('{"model": "V3", "target": "nvfp4 weight-only", "note": "fixed disk"}')
    a = begin_attempt(run, "inspect")
    set_running(run, "inspect", attempt=a, host="h", pid=os.getpid())
    set_status(run, "inspect", S.SUCCEEDED, attempt=a)
    a = begin_attempt(run, "convert")
    set_running(run, "convert", attempt=a, host="h", pid=os.getpid())
    set_status(run, "convert", S.FAILED_WORKER, attempt=a, error_class="killed", error="killed by SIGKILL")
    a = begin_attempt(run, "convert")
    set_running(run, "convert", attempt=a, host="h", pid=os.getpid())
    set_status(run, "convert", S.SUCCEEDED, attempt=a)
    with Store(tmp_path / "s.db") as st:
        assert rescan(st, tmp_path / "work") == [run.id]
        r = st.run(run.id)
        assert r.result == "SUCCEEDED" and r.root_cause == "killed: killed by SIGKILL" and r.fix_note == "fixed disk"
        att = [(x.stage, x.attempt, x.state) for x in st.attempts(run.id)]
        assert att == [("inspect", 1, "SUCCEEDED"), ("convert", 1, "FAILED_WORKER"), ("convert", 2, "SUCCEEDED")]
        sync_run(st, run.path)  # idempotent
        assert len(st.attempts(run.id)) == 3


def test_create_run_records_recipe_hash_and_git_commit(tmp_path):
    import subprocess

    from engine.runs.recipe import recipe_hash
    from engine.runs.runner import create_run
    from engine.runs.store import records_from_run_dir

    repo = tmp_path / "ops"
    repo.mkdir()
    recipe = repo / "recipe.toml"
    recipe.write_text(f'[run]\nworkdir = "{tmp_path / "work"}"\n[source]\npath = "/ckpt/DeepSeek-V3"\n'
                      '[target]\ncalibrate = true\n[calibration]\nsamples = "s.json"\nnum_samples = 64\n')
    git = ["git", "-C", str(repo), "-c", "user.email=o@p", "-c", "user.name=op"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "recipe.toml"], check=True)
    subprocess.run(git + ["commit", "-qm", "recipe"], check=True)
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    run = create_run(recipe)
    rec, attempts = records_from_run_dir(run.path)
    assert rec.git_commit == head and rec.recipe_hash == recipe_hash(recipe.read_text())
    assert rec.model == "DeepSeek-V3" and rec.target == "nvfp4 W4A4" and rec.calib_size == 64
    assert rec.result == "PENDING" and attempts == []
    assert run.recipe_path.read_text() == recipe.read_text()  # frozen copy


def test_a_sync_reads_the_run_dir_holding_the_write_lock(tmp_path, monkeypatch):
    """Two processes syncing one run (the CLI as its driver starts): the one that commits last read it last, so an
    older snapshot never overwrites a newer one."""
    from engine.runs import store as store_mod

    run = create_run_dir(tmp_path / "work")
    run.plan_path.write_text('{"run_id": "%s", "created": 5.0, "stages": [{"name": "inspect"}]}' % run.id)
    seen = []
    real = store_mod.records_from_run_dir

    with Store(tmp_path / "s.db") as st:
        def records(run_dir):
            seen.append(st.conn.in_transaction)
            return real(run_dir)

        monkeypatch.setattr(store_mod, "records_from_run_dir", records)
        sync_run(st, run.path)
        assert seen == [True]
        assert st.run(run.id) is not None
