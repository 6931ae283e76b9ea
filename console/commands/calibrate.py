"""`quantdeck calibrate` and `quantdeck export`: the functions the calibrate and export stages call, from a shell.

`calibrate` runs as one process or under torchrun (every rank runs the same command). Progress goes to
stderr (rank 0 only); stdout gets one JSON line with the summary.
"""

from __future__ import annotations

import json
import os
import sys

import click


class _StderrSink:
    def __init__(self, quiet: bool = False, rank: int = 0):
        self.quiet, self.rank = quiet, rank

    def emit(self, kind: str, **d) -> None:
        if self.quiet or self.rank != 0:
            return
        if kind == "log" and d.get("level") in ("info", "warning", "error"):
            click.echo(f"[{d.get('level')}] {d.get('msg')}", err=True)
        elif kind == "progress":
            eta = d.get("eta_s")
            click.echo(f"  {d.get('label') or ''} ({d.get('done')}/{d.get('total')} {d.get('unit')})"
                       + (f", ETA {eta:.0f}s" if eta else ""), err=True)
        elif kind == "metric" and d.get("name") == "calibrate.layer":
            t = d.get("tags") or {}
            click.echo(f"  layer {t.get('layer')}: {t.get('tokens')} tokens, {t.get('tokens_per_s', 0):.0f} tok/s, "
                       f"{t.get('seconds', 0):.1f}s", err=True)


@click.command("calibrate")
@click.option("--model", "model", required=True, type=click.Path(exists=True, file_okay=False), help="checkpoint dir")
@click.option("--samples", required=True, type=click.Path(dir_okay=False), help="JSON list of strings or JSONL")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="amax snapshot dir")
@click.option("--num-samples", type=int, default=None, help="use the first N samples (default: all)")
@click.option("--seq-len", type=int, default=512, show_default=True)
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--quant-cfg", default="NVFP4_DEFAULT_CFG", show_default=True,
              help="a modelopt config name, or deepseek-experts (experts, MLPs and attention o_proj, "
              "as modelopt's DeepSeek example)")
@click.option("--all-experts", is_flag=True, help="route every token through every expert (statistics only)")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--layers", type=int, default=None, help="stop after this many layers (resume later)")
@click.option("--quiet", is_flag=True)
def calibrate_cmd(model, samples, out, num_samples, seq_len, batch_size, quant_cfg, all_experts, device, layers,
                  quiet):
    """Calibrate activation amax layer by layer (resumable; one process or under torchrun)."""
    from engine.api import calibrate

    rank = int(os.environ.get("RANK", "0"))
    summary = calibrate(model, samples, out, num_samples=num_samples, seq_len=seq_len, batch_size=batch_size,
                        quant_cfg=quant_cfg, all_experts=all_experts, device=device,
                        sink=_StderrSink(quiet, rank), layers=layers)
    if rank == 0:
        click.echo(json.dumps(summary, default=str))


@click.command("export")
@click.option("--src", required=True, type=click.Path(exists=True, file_okay=False), help="source checkpoint")
@click.option("--amax", "amax", required=True, type=click.Path(exists=True),
              help="amax snapshot dir (quantdeck calibrate) or modelopt amax_dict_rank*-mp*.pt dir")
@click.option("--dst", required=True, type=click.Path(file_okay=False), help="output dir (one layout) or base")
@click.option("--format", "fmt", type=click.Choice(["modelopt", "compressed-tensors", "both"]), default="modelopt",
              show_default=True)
@click.option("--quiet", is_flag=True)
def export_cmd(src, amax, dst, fmt, quiet):
    """Export a calibrated W4A4 NVFP4 checkpoint from an amax snapshot (resumable)."""
    from engine.api import export_checkpoint

    layouts = ["modelopt", "compressed-tensors"] if fmt == "both" else [fmt]
    report = export_checkpoint(src, amax, dst, layouts=layouts, sink=_StderrSink(quiet))
    click.echo(json.dumps(report, default=str))
    sys.stdout.flush()


COMMANDS = (calibrate_cmd, export_cmd)
