"""The CLI's single-purpose tools (engine.api re-exports them): convert, calibrate, export, eval, inspect, s3 and
fixtures, over the same engine functions the stages run, each importing its module (and torch) when called."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.core.events import Event, EventSink


# Their keyword arguments are those of the engine function named; `sink` takes an EventSink (`emit(kind, **data)`),
# such as event_sink() gives.


def event_sink(on_event: Callable[[Event], None], stage: str | None = None) -> EventSink:
    """An event sink handing each event, tagged with `stage`, to `on_event` (a progress printer)."""
    from engine.core.events import CallbackSink

    return CallbackSink(on_event, stage=stage)


def build_fixture(out: str | os.PathLike, **kw: Any) -> Path:
    """Build a tiny real DeepSeek V3/V4 checkpoint in `out` (engine.fixtures.build_fixture); its path."""
    from engine.fixtures import build_fixture as build

    return build(out, **kw)


def build_trained_fixture(out: str | os.PathLike, **kw: Any) -> Path:
    """Train a tiny DeepSeek-V3 with MTP and write it in `out` (engine.fixtures.trained.build_trained_fixture)."""
    from engine.fixtures.trained import build_trained_fixture as build

    return build(out, **kw)


def checkpoint_totals(path: str | os.PathLike) -> tuple[int, int, int]:
    """(tensors, shards, bytes) of a checkpoint, from its headers."""
    from engine.checkpoint import CheckpointReader

    r = CheckpointReader(path)
    return len(r.names()), len(r.shards()), r.total_bytes


def calibration_available() -> tuple[bool, str]:
    """Whether the calibrated pipeline (calibrate and export, with their stages) imports here; else why not."""
    try:
        import engine.calibrate.streaming
        import engine.export.api
        import engine.stages.calibrate
        import engine.stages.export  # noqa: F401
    except ImportError as e:
        return False, str(e)
    return True, ""


def calibrate(model_dir: str | os.PathLike, samples: str | os.PathLike, out_dir: str | os.PathLike,
              **kw: Any) -> dict[str, Any]:
    """Calibrate activation amax layer by layer into `out_dir` (engine.calibrate.streaming.calibrate: resumable, one
    process or every rank under torchrun); its summary."""
    from engine.calibrate.streaming import calibrate as run

    return run(model_dir, samples, out_dir, **kw)


def export_checkpoint(src: str | os.PathLike, amax_dir: str | os.PathLike, dst: str | os.PathLike,
                      **kw: Any) -> dict[str, Any]:
    """Export a calibrated W4A4 NVFP4 checkpoint from an amax snapshot (engine.export.api.export_checkpoint:
    resumable); its report."""
    from engine.export.api import export_checkpoint as run

    return run(src, amax_dir, dst, **kw)


def convert_start_early(src: str | os.PathLike, device: str | None, target: str, entry: str | None = None) -> Any:
    """Before the converter's imports: choose the device and start reading the source (and CUDA) ahead
    (engine.convert.device.start_early)."""
    from engine.convert.device import start_early

    return start_early(src, device, target, entry=entry)


def import_converter() -> Callable[..., dict[str, Any]]:
    """Import the converter (torch and the kernels: the slow part of a start) and return it: the CLI times its
    garbage collection around this. engine.convert.convert_checkpoint(src, dst, to=, layouts=, device=, workers=,
    shard_size=, quantize_attention=, sink=) returns a summary; rerunning after a crash resumes."""
    from engine.convert import convert_checkpoint

    return convert_checkpoint


def record_start_files(entry: str) -> bool:
    """Record the files this process's start read as `entry`'s list, for the next cold start
    (engine.startup.startfiles.record); never raises."""
    from engine.startup import startfiles

    return startfiles.record(entry)


def validate_checkpoint(directory: str | os.PathLike, against: str | os.PathLike | None = None,
                        **kw: Any) -> dict[str, Any]:
    """Check a produced checkpoint, against its source when given (engine.convert.validate.validate_checkpoint);
    the report, `ok` False with its `failures`."""
    from engine.convert.validate import validate_checkpoint as run

    return run(directory, against=against, **kw)


def format_validate_report(report: dict[str, Any]) -> str:
    """validate_checkpoint's report as the human table."""
    from engine.convert.validate import format_report

    return format_report(report)


def refuse_other_model(checkpoint: str | os.PathLike, against: str | os.PathLike) -> None:
    """CheckpointError unless `against` is the same model (type, layers, hidden size) as `checkpoint`."""
    from engine.checkpoint.consistency import refuse_other_model as refuse

    refuse(checkpoint, against)


def is_amax_snapshot(directory: str | os.PathLike) -> bool:
    """Whether `directory` is a calibration's amax snapshot (its manifest), not a checkpoint. Answered from the
    manifest's `format` alone, without importing the calibration (and torch)."""
    if not (Path(directory) / "manifest.json").is_file():
        return False
    from engine.core.fsutil import read_json
    from engine.core.names import SNAPSHOT_FORMAT

    try:
        fmt = (read_json(Path(directory) / "manifest.json") or {}).get("format")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(fmt, str) and fmt.split("/")[0] == SNAPSHOT_FORMAT.split("/")[0]


def validate_amax(amax_dir: str | os.PathLike, model_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Check an amax snapshot, against the checkpoint it was calibrated from when given
    (engine.calibrate.validate.validate_amax); the report, `ok` False with its `problems`."""
    from engine.calibrate.validate import validate_amax as run

    return run(amax_dir, model_dir=model_dir)


def inject_mtp(src: str | os.PathLike, dst: str | os.PathLike, **kw: Any) -> dict[str, Any]:
    """Write `dst` = `src` with the MTP tensors it lacks (engine.convert.mtp.inject_mtp: mtp_from=, sink=)."""
    from engine.convert.mtp import inject_mtp as run

    return run(src, dst, **kw)


def evaluate(output: str | os.PathLike, against: str | os.PathLike, samples: str | os.PathLike,
             **kw: Any) -> dict[str, Any]:
    """Run `output` and its source side by side on held-out samples (engine.eval.streaming.evaluate); the report,
    with its gate's `verdict` and `reasons`."""
    from engine.eval.streaming import evaluate as run

    return run(output, against, samples, **kw)


def format_eval_report(report: dict[str, Any]) -> str:
    """evaluate's report in words."""
    from engine.eval.report import format_report

    return format_report(report)


def inspect_checkpoint(path: str | os.PathLike) -> Any:
    """What a checkpoint holds, from its headers alone (engine.models.inspect.InspectReport: to_json(), ok,
    anomalies)."""
    from engine.models.inspect import inspect_checkpoint as run

    return run(path)


def render_inspection(report: Any) -> str:
    """inspect_checkpoint's report as text."""
    from engine.models.inspect import render_text

    return render_text(report)


def s3_pull(url: str, dst: str | os.PathLike, **kw: Any) -> Any:
    """Download every object under `url` into `dst` (engine.s3.pull: parallel, resumable, verified); the result
    (its summary())."""
    from engine.s3 import pull

    return pull(url, dst, **kw)


def s3_push(src: str | os.PathLike, url: str, **kw: Any) -> Any:
    """Upload every file under `src` to `url` (engine.s3.push: shards first, index and configs last); the result
    (its summary())."""
    from engine.s3 import push

    return push(src, url, **kw)
