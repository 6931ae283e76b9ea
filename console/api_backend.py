"""Backend over engine.api (the console's only engine import): run views, logs, history, actions.

Called from worker threads only. Keeps per-run, per-rank read offsets for the calibrate stage's metric events, so a
follow tick reads only what is new.
"""

from __future__ import annotations

import json
import struct
import threading
from pathlib import Path
from typing import Any

from console.backend import Backend
from console.models import AttemptView, CalibView, HistoryRow, QualityView, RunDetailView, RunView, StageView

LOW_TOKENS = 8  # an expert that saw fewer tokens than this in a layer counts as under-covered


def _calib_label(rec: Any) -> str:
    return f"{rec.calib_size}" if getattr(rec, "calib_size", None) else ""


def history_row(rec: Any) -> HistoryRow:
    """engine.runs.store.RunRecord → HistoryRow."""
    return HistoryRow(run_id=rec.id, created=rec.created or 0.0, commit=(rec.git_commit or "")[:12],
                      model=rec.model or rec.family or "", target=rec.target or "", calib=_calib_label(rec),
                      result=rec.result or "", root_cause=rec.root_cause or "", fix=rec.fix_note or "")


def _safetensors_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file, from its JSON header alone (no torch)."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > 64 * 1024 * 1024:
            return {}
        return json.loads(fh.read(n)).get("__metadata__") or {}


def _rank_parts(progress: dict) -> tuple[tuple[int, str, float, float], ...]:
    """(rank, host, done, total) of each rank of a distributed stage's progress (engine.runs.progress_merge's "ranks")."""
    return tuple((int(r.get("rank") or 0), str(r.get("host") or ""), r.get("done") or 0, r.get("total") or 0)
                 for r in progress.get("ranks") or ())


def _number(d: dict, *keys: str) -> float | None:
    for k in keys:
        v = d.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def worst_in_report(path: str | None) -> tuple[str, float | None]:
    """The tensor with the largest relative error in a validate report ({output dir: {"tensors": [...]}})."""
    try:
        report = json.loads(Path(path).read_text()) if path else {}
    except (OSError, ValueError):
        return "", None
    best: tuple[str, float | None] = ("", None)
    for rep in report.values() if isinstance(report, dict) else ():
        for t in (rep.get("tensors") or ()) if isinstance(rep, dict) else ():
            err = _number(t, "rel_err")
            if err is not None and (best[1] is None or err > best[1]):
                best = (str(t.get("tensor") or ""), err)
    return best


class QualityReader:
    """Quality figures from a run's stages: validate's worst tensor (its result, else its report file, read once
    per change of the file) and eval's summary (kld_mean, kld_p99, top1_agree, flat or under "summary")."""

    def __init__(self) -> None:
        self._reports: dict[str, tuple[tuple[float, int], tuple[str, float | None]]] = {}

    def _worst(self, path: str | None) -> tuple[str, float | None]:
        try:
            st = Path(path).stat() if path else None
        except OSError:
            st = None
        if st is None:
            return "", None
        key = (st.st_mtime, st.st_size)
        hit = self._reports.get(str(path))
        if hit is None or hit[0] != key:
            hit = self._reports[str(path)] = (key, worst_in_report(path))
        return hit[1]

    def view(self, stages: list, report_path: str | None) -> QualityView | None:
        val = next((s for s in stages if s.name == "validate"), None)
        ev = next((s for s in stages if s.name == "eval"), None)
        if val is None and ev is None:
            return None
        tensor, worst = "", None
        if val is not None:
            res = val.result or {}
            tensor, worst = str(res.get("worst_tensor") or ""), _number(res, "worst_rel_err")
            if worst is None and val.state in ("SUCCEEDED", "FAILED"):
                tensor, worst = self._worst(report_path)
        summary: dict = {}
        if ev is not None:
            res = ev.result or {}
            summary = {**res, **(res.get("summary") if isinstance(res.get("summary"), dict) else {})}
        return QualityView(worst_tensor=tensor, worst_rel_err=worst,
                           kld_mean=_number(summary, "kld_mean"), kld_p99=_number(summary, "kld_p99"),
                           top1_agree=_number(summary, "top1_agree", "top1_agreement"),
                           validate_state=val.state if val is not None else "",
                           eval_state=ev.state if ev is not None else "")


class ApiBackend(Backend):
    def __init__(self, engine: Any | None = None):
        if engine is None:
            from engine.api import open_engine

            engine = open_engine()
        self.eng = engine
        self._lock = threading.Lock()
        self._metric_off: dict[str, int] = {}
        self._calib: dict[str, dict[int, dict]] = {}  # run → rank → its latest calibrate.layer tags
        self._coverage: dict[str, dict[str, tuple[int, int]]] = {}  # run → layer file → (experts, low)
        self._plans: dict[str, dict] = {}
        self._dirs: dict[str, Any] = {}  # run id → RunDir: later reads go by path, without opening the store
        self._quality = QualityReader()

    # ------------------------------------------------------------------ reading
    def history(self) -> tuple[HistoryRow, ...]:
        rows = [history_row(r) for r in self.eng.history()]
        rows.sort(key=lambda r: r.created, reverse=True)
        return tuple(rows)

    def attach_target(self) -> str | None:
        runs = self.eng.runs()
        if not runs:
            return None
        live = [r for r in runs if r.driver_alive or r.result == "RUNNING"]
        return (live or runs)[-1].id

    def _plan(self, run_id: str) -> dict:
        if run_id not in self._plans:
            try:
                self._plans[run_id] = self.eng.plan(self._ref(run_id))
            except Exception:  # noqa: BLE001 - a plan we cannot read only loses node names
                return {}
        return self._plans[run_id]

    def _stage_view(self, run_id: str, s: Any, plan_stage: dict) -> StageView:
        p = s.progress or {}
        bytes_total = p.get("bytes_total") or 0
        done, total = p.get("done") or 0, p.get("total") or 0
        if s.state in ("SUCCEEDED", "SKIPPED") and total and done < total:
            done = total
        nodes = tuple(plan_stage.get("nodes") or ()) if plan_stage.get("distributed") else ()
        ranks = int(p.get("world") or 0)  # engine.runs.progress_merge: the stage's ranks, each one's share in "ranks"
        parts = _rank_parts(p)
        hosts = tuple(nodes) or ((s.host,) if s.host else ())
        return StageView(name=s.name, state=s.state, unit=p.get("unit") or "", done=done, total=total,
                         rate=p.get("rate"), rate_unit="B" if bytes_total else (p.get("unit") or ""),
                         eta_s=p.get("eta_s"), hosts=hosts, ranks=ranks if ranks > 1 else 0,
                         attempt=s.attempt or 0, started_at=s.started_at, ended_at=s.ended_at,
                         error_class=s.error_class or "", error=s.error or "", label=p.get("label") or "",
                         rank_parts=parts, stalled=s.stalled, silent_s=s.silent_s,
                         quiet_ranks=tuple(int(q["rank"]) for q in s.quiet_ranks))

    def _calib_view(self, run_id: str, stage: Any, amax_dir: str | None) -> CalibView:
        """Layer and ETA from the stage's progress (the slowest rank's, engine.runs.progress_merge); samples and
        tokens/s summed over the ranks' latest calibrate.layer metrics, each rank file read by offset."""
        p = stage.progress or {}
        world = max(int(p.get("world") or 1), 1)
        per_rank = self._calib.setdefault(run_id, {})
        for rank in range(world):
            key = f"{run_id}/{rank}"
            evs, self._metric_off[key] = self.eng.events(self._ref(run_id), "calibrate",
                                                         self._metric_off.get(key, 0), rank=rank)
            for ev in evs:
                if ev.kind == "metric" and ev.data.get("name") == "calibrate.layer":
                    per_rank.setdefault(rank, {}).update(ev.data.get("tags") or {})
        last = per_rank.get(0) or next(iter(per_rank.values()), {})
        layers = int(last.get("layers") or p.get("total") or 0)
        layer = int(p.get("done") or (last.get("layer", -1) + 1) or 0)
        tps = [t["tokens_per_s"] for t in per_rank.values() if t.get("tokens_per_s") is not None]
        experts, low = self._coverage_counts(run_id, amax_dir)
        parts = _rank_parts(p)
        return CalibView(layer=layer, layers=layers, samples=sum(int(t.get("samples") or 0) for t in per_rank.values()),
                         tokens_per_s=sum(tps) if tps else None,
                         eta_s=p.get("eta_s") if stage.state == "RUNNING" else None,
                         experts_total=experts, experts_low=low, min_tokens=LOW_TOKENS,
                         ranks=world if world > 1 else 0, rank_parts=parts)

    def _coverage_counts(self, run_id: str, amax_dir: str | None) -> tuple[int, int]:
        """(experts seen, experts under LOW_TOKENS tokens) over the finished layers of the amax snapshot."""
        if not amax_dir or not Path(amax_dir).is_dir():
            return 0, 0
        cache = self._coverage.setdefault(run_id, {})
        for f in sorted(Path(amax_dir).glob("layer_*.safetensors")):
            if f.name in cache:
                continue
            try:
                cov = json.loads(_safetensors_metadata(f).get("coverage") or "{}")
            except (OSError, ValueError, struct.error):
                continue
            n = sum(len(c) for c in cov.values())
            cache[f.name] = (n, sum(1 for c in cov.values() for t in c if t < LOW_TOKENS))
        return sum(v[0] for v in cache.values()), sum(v[1] for v in cache.values())

    def _dir(self, run_id: str):
        if run_id not in self._dirs:
            self._dirs[run_id] = self.eng.find(run_id)
        return self._dirs[run_id]

    def _ref(self, run_id: str) -> str:
        """How to name a run to engine.api cheaply: its run dir path once known (no store lookup)."""
        d = self._dirs.get(run_id)
        return str(d.path) if d is not None else run_id

    def read_run(self, run_id: str) -> RunView:
        with self._lock:
            v = self.eng.status(self._ref(run_id))
            if v.id not in self._dirs:  # by its path: no second store lookup
                self._dirs[v.id] = self.eng.find(v.run_dir)
            plan = self._plan(v.id)
            pstages = {ps.get("name"): ps for ps in plan.get("stages", [])}
            stages = tuple(self._stage_view(v.id, s, pstages.get(s.name, {})) for s in v.stages)
            calib = None
            amax_dir = None
            cal = next((s for s in v.stages if s.name == "calibrate"), None)
            if cal is not None:
                amax_dir = (pstages.get("calibrate", {}).get("outputs") or {}).get("amax")
                calib = self._calib_view(v.id, cal, amax_dir)
            meta = v.meta or {}
            target = meta.get("target") or ""
            live = bool(v.driver_alive) or any(s.state in ("RUNNING", "STARTING") for s in stages)
            report = (pstages.get("validate", {}).get("outputs") or {}).get("report")
            return RunView(run_id=v.id, run_dir=v.run_dir, state=v.result, model=meta.get("model") or "",
                           target=target if not isinstance(target, dict) else json.dumps(target),
                           recipe=meta.get("recipe_path") or "", stages=stages, calib=calib, live=live,
                           has_amax=cal is not None and cal.state == "SUCCEEDED",
                           quality=self._quality.view(v.stages, report))

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
            report = next(((ps.get("outputs") or {}).get("report") for ps in plan.get("stages", [])
                           if ps.get("name") == "validate"), None)
            quality = self._quality.view(self.eng.status(run_dir).stages, report)
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
