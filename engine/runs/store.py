"""The run-history store: SQLite (WAL) on the operator's machine: the run table operators kept by hand.

Location: $QUANTDECK_HOME/store.db, else platformdirs' user data dir for "quantdeck". Every query is
parameterized; columns are added by additive migrations only. The run directories stay the source of
truth: `sync_run` upserts a run and its attempts from its run dir, and `rescan` rebuilds from a tree.
Credentials are never stored (recipes hold none; error texts are scrubbed of key=secret pairs).

Tables
    runs(id PK, created REAL, run_dir, recipe_path, recipe_hash, git_commit, model, family, target,
         layouts, calib_size, result, root_cause, root_hint, fix_note, updated REAL, kld_mean REAL,
         top1_agree REAL)  -- the eval stage's figures (NULL without one)
    attempts(run_id, stage, attempt, host, pid, started_at REAL, ended_at REAL, state, error_class,
             error_text, hint; PK(run_id, stage, attempt))
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from engine.core.fsutil import read_json
from engine.core.names import StageState
from engine.core.settings import settings
from engine.runs.rundir import RunDir, list_run_dirs, read_status

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS runs (
        id TEXT PRIMARY KEY, created REAL, run_dir TEXT, recipe_path TEXT, recipe_hash TEXT,
        git_commit TEXT, model TEXT, target TEXT, calib_size INTEGER, result TEXT, root_cause TEXT,
        fix_note TEXT)""",
    """CREATE TABLE IF NOT EXISTS attempts (
        run_id TEXT NOT NULL, stage TEXT NOT NULL, attempt INTEGER NOT NULL, host TEXT, pid INTEGER,
        started_at REAL, ended_at REAL, state TEXT, error_class TEXT, error_text TEXT,
        PRIMARY KEY (run_id, stage, attempt))""",
    "CREATE INDEX IF NOT EXISTS attempts_run ON attempts(run_id)",
]
# (table, column, type): additive migrations, applied when missing (db_utils.add_column_to_table).
COLUMNS = [
    ("runs", "family", "TEXT"),
    ("runs", "layouts", "TEXT"),
    ("runs", "root_hint", "TEXT"),
    ("runs", "updated", "REAL"),
    ("attempts", "hint", "TEXT"),
    ("runs", "kld_mean", "REAL"),
    ("runs", "top1_agree", "REAL"),
]

RUN_FIELDS = ("id", "created", "run_dir", "recipe_path", "recipe_hash", "git_commit", "model", "family",
              "target", "layouts", "calib_size", "result", "root_cause", "root_hint", "fix_note", "updated",
              "kld_mean", "top1_agree")
ATTEMPT_FIELDS = ("run_id", "stage", "attempt", "host", "pid", "started_at", "ended_at", "state",
                  "error_class", "error_text", "hint")
_SECRET = re.compile(r"(?i)(aws_secret_access_key|aws_session_token|secret|password|token|passphrase)"
                     r"(\s*[=:]\s*)(\S+)")


def scrub(text: str | None) -> str | None:
    """Remove values that look like credentials (`secret=…`, `token: …`) from a text before storing it."""
    if text is None:
        return None
    return _SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)


def home_dir() -> Path:
    env = settings().home
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_data_dir("quantdeck", appauthor=False))


def default_db_path() -> Path:
    return home_dir() / "store.db"


@dataclass(frozen=True)
class RunRecord:
    id: str
    created: float | None = None
    run_dir: str | None = None
    recipe_path: str | None = None
    recipe_hash: str | None = None
    git_commit: str | None = None
    model: str | None = None
    family: str | None = None
    target: str | None = None
    layouts: str | None = None
    calib_size: int | None = None
    result: str | None = None
    root_cause: str | None = None
    root_hint: str | None = None
    fix_note: str | None = None
    updated: float | None = None
    kld_mean: float | None = None  # the eval stage's mean KL divergence of the output from the source
    top1_agree: float | None = None  # and its top-1 agreement (a fraction)

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in RUN_FIELDS}


@dataclass(frozen=True)
class AttemptRecord:
    run_id: str
    stage: str
    attempt: int
    host: str | None = None
    pid: int | None = None
    started_at: float | None = None
    ended_at: float | None = None
    state: str | None = None
    error_class: str | None = None
    error_text: str | None = None
    hint: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ATTEMPT_FIELDS}


class Store:
    """The history database. Methods raise sqlite3 errors only for a broken database file."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else default_db_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        # no fsync per commit (the WAL stays consistent; a power cut may lose the last commits): the run dirs are
        # the truth and `rescan` rebuilds the rows, while a commit's fsync waits behind a stage's gigabytes of writes
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA busy_timeout=30000")
        self._migrate()

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _migrate(self) -> None:
        for stmt in SCHEMA:
            self.conn.execute(stmt)
        for table, col, typ in COLUMNS:
            have = {r["name"] for r in self.conn.execute(f"PRAGMA table_info({table})")}
            if col not in have:
                try:
                    self.conn.execute(f"ALTER TABLE {table} ADD COLUMN {col} {typ}")
                except sqlite3.OperationalError as e:  # another process added it meanwhile
                    if "duplicate column" not in str(e):
                        raise

    # --- writes ----------------------------------------------------------------------------------------

    def upsert_run(self, rec: RunRecord | dict[str, Any], *, keep_note: bool = True) -> None:
        data = rec.to_json() if isinstance(rec, RunRecord) else {k: rec.get(k) for k in RUN_FIELDS}
        data["updated"] = time.time()
        data["root_cause"] = scrub(data.get("root_cause"))
        cols = [k for k in RUN_FIELDS]
        sets = ", ".join(f"{k}=excluded.{k}" for k in cols if k != "id" and not (keep_note and k == "fix_note"))
        if keep_note:
            sets += ", fix_note=COALESCE(excluded.fix_note, runs.fix_note)"
        sql = (f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)}) "
               f"ON CONFLICT(id) DO UPDATE SET {sets}")
        self.conn.execute(sql, [data.get(k) for k in cols])

    def upsert_attempt(self, rec: AttemptRecord | dict[str, Any]) -> None:
        data = rec.to_json() if isinstance(rec, AttemptRecord) else {k: rec.get(k) for k in ATTEMPT_FIELDS}
        data["error_text"] = scrub(data.get("error_text"))
        cols = list(ATTEMPT_FIELDS)
        sets = ", ".join(f"{k}=excluded.{k}" for k in cols if k not in ("run_id", "stage", "attempt"))
        sql = (f"INSERT INTO attempts ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)}) "
               f"ON CONFLICT(run_id, stage, attempt) DO UPDATE SET {sets}")
        self.conn.execute(sql, [data.get(k) for k in cols])

    def set_note(self, run_id: str, note: str) -> bool:
        cur = self.conn.execute("UPDATE runs SET fix_note=?, updated=? WHERE id=?", (note, time.time(), run_id))
        return cur.rowcount > 0

    def delete_run(self, run_id: str) -> None:
        self.conn.execute("DELETE FROM attempts WHERE run_id=?", (run_id,))
        self.conn.execute("DELETE FROM runs WHERE id=?", (run_id,))

    # --- reads -----------------------------------------------------------------------------------------

    def runs(self, limit: int | None = None) -> list[RunRecord]:
        sql = "SELECT * FROM runs ORDER BY created ASC, id ASC"
        rows = self.conn.execute(sql).fetchall()
        recs = [RunRecord(**{k: r[k] for k in RUN_FIELDS}) for r in rows]
        return recs[-limit:] if limit else recs

    def run(self, run_id: str) -> RunRecord | None:
        r = self.conn.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()
        return RunRecord(**{k: r[k] for k in RUN_FIELDS}) if r else None

    def attempts(self, run_id: str | None = None) -> list[AttemptRecord]:
        if run_id is None:
            rows = self.conn.execute("SELECT * FROM attempts ORDER BY run_id, COALESCE(started_at, 0), stage, attempt")
        else:
            rows = self.conn.execute(
                "SELECT * FROM attempts WHERE run_id=? ORDER BY COALESCE(started_at, ended_at, 0), stage, attempt",
                (run_id,))
        return [AttemptRecord(**{k: r[k] for k in ATTEMPT_FIELDS}) for r in rows.fetchall()]


def sync_records(store: Store, records: Callable[[], tuple[RunRecord, Iterable[AttemptRecord]]]) -> RunRecord:
    """Upsert one run and its attempts in one transaction; `records()` gives them, called once the transaction
    holds the write lock (two processes syncing one run: whoever commits last also read the run last)."""
    store.conn.execute("BEGIN IMMEDIATE")
    try:
        run, attempts = records()
        store.upsert_run(run)
        for a in attempts:
            store.upsert_attempt(a)
        store.conn.execute("COMMIT")
    except BaseException:
        store.conn.execute("ROLLBACK")
        raise
    return run


# --- from run directories (the source of truth) ----------------------------------------------------------


def run_result(states: list[str]) -> StageState:
    """A run's result from its stages' current states: RUNNING, SUCCEEDED, FAILED, CANCELLED or PENDING."""
    st = [StageState(s) for s in states]
    if any(s in (StageState.STARTING, StageState.RUNNING) for s in st):
        return StageState.RUNNING
    if st and all(s.is_done() for s in st):
        return StageState.SUCCEEDED
    if any(s == StageState.CANCELLED for s in st):
        return StageState.CANCELLED
    if any(s in (StageState.FAILED, StageState.FAILED_WORKER) for s in st):
        return StageState.FAILED
    return StageState.PENDING


def records_from_run_dir(run_dir: str | os.PathLike) -> tuple[RunRecord, list[AttemptRecord]]:
    """The store's rows for one run directory (its run.json, plan.json and every stage's status.json)."""
    run = RunDir(Path(run_dir))
    meta = run.read_meta()
    plan = run.read_plan()
    attempts: list[AttemptRecord] = []
    states: list[str] = []
    failures: list[tuple[float, str, str | None, str | None]] = []
    for s in plan.get("stages", []):
        st = read_status(run, s["name"])
        states.append(st["state"])
        recs = list(st.get("attempts", []))
        if st.get("attempt") and all(a.get("attempt") != st["attempt"] for a in recs):
            recs.append({k: st.get(k) for k in ("attempt", "state", "host", "pid", "started_at", "ended_at",
                                                 "error_class", "error", "hint")})
        for a in recs:
            attempts.append(AttemptRecord(run_id=run.id, stage=s["name"], attempt=int(a["attempt"]),
                                          host=a.get("host"), pid=a.get("pid"), started_at=a.get("started_at"),
                                          ended_at=a.get("ended_at"), state=a.get("state"),
                                          error_class=a.get("error_class"), error_text=a.get("error"),
                                          hint=a.get("hint")))
            if a.get("state") in (StageState.FAILED, StageState.FAILED_WORKER, StageState.CANCELLED):
                failures.append((a.get("ended_at") or 0.0, a.get("error_class") or "unknown",
                                 a.get("error"), a.get("hint")))
    kld, top1 = eval_figures(run, plan)
    failures.sort(key=lambda f: f[0])
    root = failures[-1] if failures else None
    rec = RunRecord(
        id=run.id, created=meta.get("created") or plan.get("created"), run_dir=str(run.path),
        recipe_path=meta.get("recipe_path"), recipe_hash=meta.get("recipe_hash") or plan.get("recipe_hash"),
        git_commit=meta.get("git_commit"), model=meta.get("model"), family=meta.get("family"),
        target=meta.get("target"), layouts=meta.get("layouts"), calib_size=meta.get("calib_size"),
        result=run_result(states),
        root_cause=(f"{root[1]}: {root[2]}" if root[2] else root[1]) if root else None,
        root_hint=root[3] if root else None, fix_note=meta.get("note"), kld_mean=kld, top1_agree=top1)
    return rec, attempts


def eval_report(path: str | None) -> dict[str, Any]:
    """The eval stage's report file (where a failed gate leaves its figures); {} while it is absent, being replaced
    or unreadable."""
    try:
        rep = read_json(path) if path else None
    except (OSError, ValueError):
        return {}
    return rep if isinstance(rep, dict) else {}


def eval_figures(run: Any, plan: dict[str, Any]) -> tuple[float | None, float | None]:
    """(KLD mean, top-1 agreement) of a run's eval stage: its result, else (a failed gate) its report file."""
    import math

    stage = next((s for s in plan.get("stages", []) if s.get("name") == "eval"), None)
    if stage is None:
        return None, None
    res = read_status(run, "eval").get("result") or {}
    if "kld_mean" not in res:
        res = eval_report((stage.get("outputs") or {}).get("report"))

    def num(v: Any) -> float | None:
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None

    return num(res.get("kld_mean")), num(res.get("top1_agree"))


def sync_run(store: Store, run_dir: str | os.PathLike) -> RunRecord:
    """Upsert one run and its attempts from its run directory; returns the run's record."""
    return sync_records(store, lambda: records_from_run_dir(run_dir))


def rescan(store: Store, root: str | os.PathLike) -> list[str]:
    """Rebuild the store's rows from every run directory under `root`; returns the run ids found."""
    ids = []
    for run in list_run_dirs(root):
        try:
            sync_run(store, run.path)
        except (OSError, ValueError, KeyError):
            continue  # a half-written run dir is skipped, never fatal
        ids.append(run.id)
    return ids
