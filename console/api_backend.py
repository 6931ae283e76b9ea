"""Backend over engine.api (the console's way into the engine, beside its errors and names): run views, logs,
history, actions.

Called from worker threads only. The run view is engine.api's, with its calibration and quality figures; the engine
instance keeps the read offsets across follow ticks, so a tick reads only what is new.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from console.backend import Backend
from console.models import AttemptView, HistoryRow, RunDetailView
from engine.core.names import StageState

if TYPE_CHECKING:
    from engine.api import RunView


def _calib_label(rec: Any) -> str:
    return f"{rec.calib_size}" if getattr(rec, "calib_size", None) else ""


def history_row(rec: Any) -> HistoryRow:
    """engine.api RunRecord → HistoryRow."""
    return HistoryRow(run_id=rec.id, created=rec.created or 0.0, commit=(rec.git_commit or "")[:12],
                      model=rec.model or rec.family or "", target=rec.target or "", calib=_calib_label(rec),
                      result=rec.result or "", root_cause=rec.root_cause or "", fix=rec.fix_note or "",
                      kld=rec.kld_mean, top1=rec.top1_agree)


class ApiBackend(Backend):
    def __init__(self, engine: Any | None = None):
        if engine is None:
            from engine.api import open_engine

            engine = open_engine()
        self.eng = engine
        self._lock = threading.Lock()
        self._dirs: dict[str, Any] = {}  # run id → its run dir: later reads go by path, without opening the store

    # ------------------------------------------------------------------ reading
    def history(self) -> tuple[HistoryRow, ...]:
        rows = [history_row(r) for r in self.eng.history()]
        rows.sort(key=lambda r: r.created, reverse=True)
        return tuple(rows)

    def attach_target(self) -> str | None:
        runs = self.eng.runs()
        if not runs:
            return None
        live = [r for r in runs if r.driver_alive or r.result == StageState.RUNNING]
        return (live or runs)[-1].id

    def _ref(self, run_id: str) -> str:
        """How to name a run to engine.api cheaply: its run dir path once known (no store lookup)."""
        d = self._dirs.get(run_id)
        return str(d.path) if d is not None else run_id

    def read_run(self, run_id: str) -> RunView:
        with self._lock:
            v = self.eng.status(self._ref(run_id), figures=True)
            if v.id not in self._dirs:  # by its path: no second store lookup
                self._dirs[v.id] = self.eng.find(v.run_dir)
            return v

    def read_log(self, run_id: str, stage: str, offset: int) -> tuple[list[str], int]:
        text, nxt = self.eng.log(self._ref(run_id), stage, offset)
        cut = text.rfind("\n")
        if cut < 0:
            return [], offset
        used = len(text[: cut + 1].encode("utf-8", errors="replace"))
        return text[:cut].splitlines(), offset + used

    def detail(self, run_id: str) -> RunDetailView:
        rec = next((r for r in self.eng.history() if r.id == run_id), None)
        row = history_row(rec) if rec is not None else HistoryRow(run_id, 0.0)
        atts = tuple(AttemptView(stage=a.stage, attempt=a.attempt, host=a.host or "", pid=a.pid,
                                 started_at=a.started_at, ended_at=a.ended_at, state=a.state or "",
                                 error_class=a.error_class or "", error=a.error_text or "")
                     for a in self.eng.attempts(run_id))
        arts: list[str] = []
        run_dir = ""
        quality = None
        try:
            run_dir = str(self.eng.find(run_id).path)
            plan = self.eng.plan(run_id)
            for ps in plan.get("stages", []):
                for v in (ps.get("outputs") or {}).values():
                    if isinstance(v, str) and v not in arts and (Path(v).exists() or Path(v + ".partial").exists()):
                        arts.append(v if Path(v).exists() else v + ".partial (unfinished)")
            quality = self.eng.status(run_dir, figures=True).quality
        except Exception:  # noqa: BLE001 - artifacts are a convenience; the attempts are what matters
            pass
        return RunDetailView(row=row, run_dir=run_dir, attempts=atts, artifacts=tuple(arts), quality=quality)

    # ------------------------------------------------------------------ acting
    def set_note(self, run_id: str, text: str) -> None:
        self.eng.note(run_id, text)

    def _factory(self, run_id: str | None = None, recipe_path: str | None = None) -> str | None:
        """remote's launcher factory when the recipe has a cluster (as the CLI does), else local."""
        try:
            recipe = self.eng.load_recipe(recipe_path) if recipe_path else None
            if recipe is None and run_id:
                recipe = self.eng.load_recipe(str(self.eng.find(run_id).recipe_path))
            if recipe is not None and not recipe.cluster.is_local:
                import remote.launchers as rl

                if hasattr(rl, "launcher_for"):
                    return "remote.launchers:launcher_for"
        except ImportError:
            return None
        return None

    def start(self, recipe_path: str) -> str:
        return self.eng.start(recipe_path, launcher_factory=self._factory(recipe_path=recipe_path))

    def resume(self, run_id: str) -> str:
        return self.eng.resume(run_id, launcher_factory=self._factory(run_id=run_id))

    def export_only(self, run_id: str) -> str:
        return self.eng.export_only(run_id, launcher_factory=self._factory(run_id=run_id))

    def validate_only(self, run_id: str) -> str:
        """In a child process (`quantdeck validate-only RUN --json`): its checks load torch, the console must not."""
        import os
        import subprocess
        import sys

        from engine.api import raise_if_problems
        from engine.core.errors import RunError

        run_dir = str(self.eng.find(run_id).path)  # the child finds the run by its directory, whatever the env
        proc = subprocess.run([sys.executable, "-m", "console", "validate-only", run_dir, "--json"],
                              capture_output=True, text=True, env=dict(os.environ), stdin=subprocess.DEVNULL)
        try:
            report = json.loads(proc.stdout)
        except ValueError:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise RunError(f"validate-only {run_id} did not report: {last}", at=run_id,
                           hint=f"run `quantdeck validate-only {run_id}` in a shell to see why") from None
        raise_if_problems(report.get("problems", []), f"validate-only {run_id}")
        return f"validate-only {run_id}: everything saved checks out"

    def cancel(self, run_id: str) -> str:
        stages = self.eng.cancel(run_id)
        return f"cancelled {run_id}: " + (", ".join(stages) if stages else "nothing was running")
