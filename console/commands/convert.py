"""`quantdeck convert`, `quantdeck validate`, `quantdeck inject-mtp`: thin click wrappers over engine.api's tools.

The engine is imported inside each command body, so importing the CLI never imports torch. Progress goes
to stderr (a bar on a terminal, a line now and then otherwise); stdout carries only data (summary / JSON).
"""

from __future__ import annotations

import json
import sys
import time

import click


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


class _StderrProgress:
    """Turns engine events into a one-line progress bar on a terminal (log lines otherwise)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._last_line = 0.0

    def __call__(self, ev) -> None:
        d = ev.data
        if ev.kind == "log":
            self._clear()
            click.echo(f"{d.get('level', 'info')}: {d.get('msg', '')}", err=True)
        elif ev.kind == "progress":
            total, done = d.get("total") or 0, d.get("done") or 0
            frac = done / total if total else 1.0
            rate = d.get("rate") or 0
            eta = d.get("eta_s")
            rate_s = f"{_fmt_bytes(rate)}/s" if d.get("bytes_total") else f"{rate:.1f} {d.get('unit')}/s"
            eta_s = f"ETA {eta:.0f}s" if eta is not None and done < total else ""
            if self.tty:
                bar = "#" * int(frac * 30)
                self.stream.write(f"\r[{bar:<30}] {frac * 100:5.1f}% {done}/{total} {d.get('unit')} "
                                  f"{rate_s} {eta_s}\x1b[K")
                self.stream.flush()
                if done >= total:
                    self.stream.write("\n")
            elif time.monotonic() - self._last_line > 5 or done >= total:
                self._last_line = time.monotonic()
                click.echo(f"progress: {done}/{total} {d.get('unit')} ({frac * 100:.0f}%) {rate_s} {eta_s}",
                           err=True)

    def _clear(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")


def _kernel_threads(n: int | None) -> None:
    """--kernel-threads: handed on as QUANTDECK_KERNEL_THREADS, which the kernels (and `--workers` children) read."""
    if n is not None:
        import os

        os.environ["QUANTDECK_KERNEL_THREADS"] = str(n)


def _sink():
    from engine.api import event_sink

    return event_sink(_StderrProgress(), stage="convert")


START_FILES = "quantdeck-convert"  # this entry's list of the files its start reads (engine.startup.startfiles)


@click.command("convert")
@click.option("--src", required=True, type=click.Path(file_okay=False), help="source checkpoint directory")
@click.option("--dst", required=True, type=click.Path(file_okay=False), help="output directory (built in DST.partial)")
@click.option("--to", "to", required=True, type=click.Choice(["nvfp4", "fp8-block", "bf16"]), help="target format")
@click.option("--format", "fmt", default="modelopt", show_default=True,
              type=click.Choice(["modelopt", "compressed-tensors", "both"]),
              help="NVFP4 output layout; both writes DST/modelopt and DST/compressed-tensors")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 256),
              help="processes splitting the output shards (GPUs round-robin on CUDA)")
@click.option("--kernel-threads", default=None, type=click.IntRange(0, 4096),
              help="threads of one parallel CPU kernel call (0: every usable core; as QUANTDECK_KERNEL_THREADS)")
@click.option("--shard-size", default="5GB", show_default=True, help="target output shard size (5GB, 500MB, 5e9)")
@click.option("--quantize-attention", is_flag=True, help="quantize attention GEMMs too (default: kept BF16)")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def convert_cmd(src, dst, to, fmt, device, workers, kernel_threads, shard_size, quantize_attention, as_json):
    """Convert a checkpoint to NVFP4 (weight-only), FP8-block or BF16, streaming and resumable. An NVFP4 source
    (either layout) is decoded for --to bf16 and re-laid as it is (same codes and scales) for --to nvfp4."""
    _kernel_threads(kernel_threads)
    import gc

    from engine.api import convert_start_early, import_converter, record_start_files

    # the disk reads the start's files and the source (and CUDA starts) while the imports run
    convert_start_early(src, device, to, entry=START_FILES)
    gc.disable()  # no collections while (torch's) million objects load ...
    convert_checkpoint = import_converter()
    gc.freeze()  # ... and later ones never walk them
    gc.enable()
    layouts = ["modelopt", "compressed-tensors"] if fmt == "both" else [fmt]
    summary = convert_checkpoint(src, dst, to=to, layouts=layouts, device=device, workers=workers,
                                 shard_size=shard_size, quantize_attention=quantize_attention, sink=_sink())
    if summary.get("device") == "cpu":  # what this start read, for the next cold one (engine.startup.startfiles)
        record_start_files(START_FILES)
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    click.echo(f"wrote {', '.join(summary['outputs'].values())}: {summary['items']} items, "
               f"{summary['shards']} shard(s) ({summary['shards_kept']} kept from an earlier run), "
               f"{summary['quantized_modules']} modules quantized, {len(summary['kept_modules'])} kept, "
               f"{summary['wall_s']:.1f}s on {summary['device']}")


# `--amax DIR` also checks a calibration amax snapshot (engine.calibrate.validate.validate_amax) against the model
# (--model, else the --against source, else the checkpoint) and merges its report (engine.convert.validate).
# Without a checkpoint (`quantdeck validate --amax AMAX [--model CKPT]`, or a snapshot given as DIRECTORY) only the
# snapshot is checked: nothing heavy runs.
@click.command("validate")
@click.argument("directory", type=click.Path(file_okay=False), required=False)
@click.option("--against", type=click.Path(file_okay=False), default=None,
              help="the source checkpoint: report rel. error / SNR and run the first decoder block against it")
@click.option("--amax", type=click.Path(file_okay=False), default=None,
              help="an amax snapshot directory to check (alone, or to cross-check a calibrated export)")
@click.option("--model", type=click.Path(file_okay=False), default=None,
              help="with --amax: the checkpoint it was calibrated from (layer count, expected quantizers)")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("--device", default="auto", show_default=True,
              help="where the decoder-block check runs: auto (a GPU where there is one), cpu, cuda[:N]")
def validate_cmd(directory, against, amax, model, as_json, device):
    """Check a produced checkpoint (DIRECTORY), or an amax snapshot (--amax); exits non-zero naming the tensor or
    quantizer on any failure. Warnings (what a loader gets wrong with a valid checkpoint) do not fail it."""
    from engine.api import (
        format_validate_report,
        is_amax_snapshot,
        refuse_other_model,
        validate_amax,
        validate_checkpoint,
    )
    from engine.core.errors import ValidationFailedError

    if directory is not None and amax is None and is_amax_snapshot(directory):
        directory, amax = None, directory
    if directory is None:
        if amax is None:
            raise click.UsageError("give a checkpoint DIRECTORY to validate, or --amax AMAX_DIR [--model CKPT]")
        rep = validate_amax(amax, model_dir=model or against)
        click.echo(json.dumps(rep, indent=2, default=str) if as_json else _format_amax(rep))
        if not rep["ok"]:
            raise ValidationFailedError(f"amax snapshot {amax}: {rep['problems'][0]}", at=str(amax),
                                        hint="resume the calibration, or recalibrate into a fresh --out")
        return
    if against is not None:
        refuse_other_model(directory, against)  # another family or shape: say so before reading a tensor
    report = validate_checkpoint(directory, against=against, amax=amax, device=device, sink=_sink(),
                                 amax_model=model)
    click.echo(json.dumps(report, indent=2, default=str) if as_json else format_validate_report(report))
    if not report["ok"]:
        first = report["failures"][0]
        raise ValidationFailedError(f"{len(report['failures'])} check(s) failed; first: {first['msg']}",
                                    at=first.get("at"), hint="see the report above")


def _format_amax(rep: dict) -> str:
    lines = [f"amax snapshot {rep['amax_dir']}  [{rep.get('kind')}]"]
    if rep.get("kind") == "quantdeck-snapshot":
        lines.append(f"layers   {rep.get('layers_done')} of {rep.get('num_layers')} calibrated, "
                     f"status {rep.get('status')}, config {rep.get('quant_cfg')}")
    else:
        lines.append(f"files    {rep.get('files')} amax_dict file(s)")
    lines.append(f"amax     {rep.get('quantizers', 0)} quantizers" + (
        f", {rep['experts_without_tokens']} expert(s) without tokens" if "experts_without_tokens" in rep else ""))
    lines += [f"FAIL amax: {p}" for p in rep["problems"]]
    lines.append("OK" if rep["ok"] else f"FAILED ({len(rep['problems'])})")
    return "\n".join(lines)


@click.command("inject-mtp")
@click.argument("src", type=click.Path(file_okay=False))
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--mtp-from", type=click.Path(file_okay=False), default=None,
              help="original checkpoint to take a missing MTP layer from (kept BF16, excluded from quantization)")
def inject_mtp_cmd(src, dst, mtp_from):
    """Copy the shared embedding and LM head into the MTP layer(s) where SRC lacks them; writes DST."""
    from engine.api import inject_mtp

    res = inject_mtp(src, dst, mtp_from=mtp_from, sink=_sink())
    click.echo(f"wrote {res['dst']}: injected {len(res['injected'])} tensor(s) into {', '.join(res['mtp_layers'])}")


COMMANDS = (convert_cmd, validate_cmd, inject_mtp_cmd)
