"""The calibration and quality figures the console shows of a run (CalibView, QualityView), read incrementally by a
FigureReader kept across views: per rank, the calibrate stage's metric events by offset; each layer file of the amax
snapshot once (its expert coverage); validate's and eval's report files once per change (QualityReader).
engine.runs.runview's run_view attaches them to a RunView on request."""

from __future__ import annotations

import json
import math
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.core.events import read_events
from engine.core.names import StageName, StageState
from engine.runs.rundir import RunDir
from engine.runs.store import eval_report as read_eval_report

if TYPE_CHECKING:
    from engine.runs.runview import RunView

LOW_TOKENS = 8  # an expert that saw fewer tokens than this in a layer counts as under-covered


@dataclass(frozen=True)
class QualityView:
    """The output's figures: validate's worst tensor against the source, eval's KL divergence and top-1
    agreement (None where the run has not measured them)."""

    worst_tensor: str = ""
    worst_rel_err: float | None = None
    kld_mean: float | None = None
    kld_p99: float | None = None
    top1_agree: float | None = None  # a fraction, 0..1
    validate_state: str = ""  # the validate stage's state ("" without one)
    eval_state: str = ""  # the eval stage's state ("" without one)


@dataclass(frozen=True)
class CalibView:
    """The calibrate stage's figures: its layer, samples and tokens/s over all ranks, expert coverage."""

    layer: int = 0
    layers: int = 0
    samples: int = 0
    tokens_per_s: float | None = None
    eta_s: float | None = None
    experts_total: int = 0
    experts_low: int = 0
    min_tokens: int = 0
    ranks: int = 0  # calibrate on several ranks: how many, and each one's (rank, host, layer, layers)
    rank_parts: tuple[tuple[int, str, float, float], ...] = ()


def _number(d: dict, *keys: str) -> float | None:
    for k in keys:
        v = d.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


def _outputs(plan: dict[str, Any], stage: str) -> dict[str, Any]:
    return next((ps.get("outputs") or {} for ps in plan.get("stages", []) if ps.get("name") == stage), {})


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file, from its JSON header alone (no torch)."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > 64 * 1024 * 1024:
            return {}
        return json.loads(fh.read(n)).get("__metadata__") or {}


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
    """Quality figures from a run's stages: validate's worst tensor (its result, else its report file) and eval's
    summary (its result, else, after a failed gate, its report file); each file read once per change."""

    def __init__(self) -> None:
        self._reports: dict[str, tuple[tuple[float, int], Any]] = {}

    def _once(self, path: str | None, read: Any, empty: Any) -> Any:
        try:
            st = Path(path).stat() if path else None
        except OSError:
            st = None
        if st is None:
            return empty
        key = (st.st_mtime, st.st_size)
        hit = self._reports.get(str(path))
        if hit is None or hit[0] != key:
            hit = self._reports[str(path)] = (key, read(path))
        return hit[1]

    def _worst(self, path: str | None) -> tuple[str, float | None]:
        return self._once(path, worst_in_report, ("", None))

    def view(self, stages: Any, report_path: str | None, eval_report: str | None = None) -> QualityView | None:
        val = next((s for s in stages if s.name == StageName.VALIDATE), None)
        ev = next((s for s in stages if s.name == StageName.EVAL), None)
        if val is None and ev is None:
            return None
        tensor, worst = "", None
        if val is not None:
            res = val.result or {}
            tensor, worst = str(res.get("worst_tensor") or ""), _number(res, "worst_rel_err")
            if worst is None and val.state in (StageState.SUCCEEDED, StageState.FAILED):
                tensor, worst = self._worst(report_path)
        summary: dict = {}
        if ev is not None:
            summary = ev.result or {}
            if "kld_mean" not in summary and ev.state == StageState.FAILED:  # a failed gate: figures in its report
                summary = self._once(eval_report, read_eval_report, {})
        return QualityView(worst_tensor=tensor, worst_rel_err=worst,
                           kld_mean=_number(summary, "kld_mean"), kld_p99=_number(summary, "kld_p99"),
                           top1_agree=_number(summary, "top1_agree"),
                           validate_state=val.state if val is not None else "",
                           eval_state=ev.state if ev is not None else "")


class FigureReader:
    """The calibration and quality figures of the runs viewed, kept across views so a caller viewing a run every
    second reads only what is new: per rank, the calibrate stage's metric events by offset; each layer file of the
    amax snapshot once (its expert coverage); a validate report once per change. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._offsets: dict[Path, int] = {}  # a calibrate rank's events file → bytes read
        self._tags: dict[Path, dict[int, dict]] = {}  # run dir → rank → its latest calibrate.layer tags
        self._coverage: dict[Path, dict[str, tuple[int, int]]] = {}  # run dir → layer file → (experts, low)
        self._quality = QualityReader()

    def quality(self, stages: Any, plan: dict[str, Any]) -> QualityView | None:
        with self._lock:
            return self._quality.view(stages, _outputs(plan, StageName.VALIDATE).get("report"),
                                      _outputs(plan, StageName.EVAL).get("report"))

    def calib(self, rd: RunDir, view: RunView, plan: dict[str, Any]) -> CalibView | None:
        """Layer and ETA from the stage's progress (the slowest rank's, engine.runs.progress_merge); samples and
        tokens/s summed over the ranks' latest calibrate.layer metrics."""
        stage = view.stage(StageName.CALIBRATE)
        if stage is None:
            return None
        p = stage.progress or {}
        world = max(int(p.get("world") or 1), 1)
        with self._lock:
            per_rank = self._tags.setdefault(rd.path, {})
            for rank in range(world):
                path = rd.events_path(StageName.CALIBRATE, rank)
                evs, self._offsets[path] = read_events(path, self._offsets.get(path, 0))
                for ev in evs:
                    if ev.kind == "metric" and ev.data.get("name") == "calibrate.layer":
                        per_rank.setdefault(rank, {}).update(ev.data.get("tags") or {})
            experts, low = self._coverage_counts(rd.path, _outputs(plan, StageName.CALIBRATE).get("amax"))
            per_rank = {r: dict(t) for r, t in per_rank.items()}  # a copy: other threads add ranks under the lock
        last = per_rank.get(0) or next(iter(per_rank.values()), {})
        layers = int(last.get("layers") or p.get("total") or 0)
        layer = int(p.get("done") or (last.get("layer", -1) + 1) or 0)
        tps = [t["tokens_per_s"] for t in per_rank.values() if t.get("tokens_per_s") is not None]
        return CalibView(layer=layer, layers=layers, samples=sum(int(t.get("samples") or 0) for t in per_rank.values()),
                         tokens_per_s=sum(tps) if tps else None,
                         eta_s=p.get("eta_s") if stage.state == StageState.RUNNING else None,
                         experts_total=experts, experts_low=low, min_tokens=LOW_TOKENS,
                         ranks=world if world > 1 else 0, rank_parts=stage.rank_parts)

    def _coverage_counts(self, run: Path, amax_dir: str | None) -> tuple[int, int]:
        """(experts seen, experts under LOW_TOKENS tokens) over the finished layers of the amax snapshot."""
        if not amax_dir or not Path(amax_dir).is_dir():
            return 0, 0
        cache = self._coverage.setdefault(run, {})
        for f in sorted(Path(amax_dir).glob("layer_*.safetensors")):
            if f.name in cache:
                continue
            try:
                cov = json.loads(safetensors_metadata(f).get("coverage") or "{}")
            except (OSError, ValueError, struct.error):
                continue
            n = sum(len(c) for c in cov.values())
            cache[f.name] = (n, sum(1 for c in cov.values() for t in c if t < LOW_TOKENS))
        return sum(v[0] for v in cache.values()), sum(v[1] for v in cache.values())
