"""`quantdeck eval OUT --against SRC --samples FILE`: a thin click wrapper over engine.api's evaluate.

The engine is imported inside the command body, so importing the CLI never imports torch. Progress goes to stderr;
stdout carries only the report (text, or one JSON object with --json). A failed gate exits 4.
"""

from __future__ import annotations

import json

import click

DEFAULT_MAX_KLD_MEAN = 0.1  # engine.eval.report's defaults, spelled here so --help needs no engine import
DEFAULT_MIN_TOP1 = 0.9


@click.command("eval")
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--against", required=True, type=click.Path(file_okay=False), help="the source checkpoint")
@click.option("--samples", required=True, type=click.Path(dir_okay=False),
              help="held-out samples (the calibration samples formats: JSON list, JSONL text or messages)")
@click.option("--num-samples", type=click.IntRange(1), default=None,
              help="samples to use  [default: 64, or all of a shorter file]")
@click.option("--seq-len", type=click.IntRange(1), default=2048, show_default=True, help="tokens per sample at most")
@click.option("--batch-size", type=click.IntRange(1), default=1, show_default=True, help="samples per forward")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")
@click.option("--max-kld-mean", type=float, default=DEFAULT_MAX_KLD_MEAN, show_default=True,
              help="the gate: largest mean KL divergence that passes")
@click.option("--min-top1", type=float, default=DEFAULT_MIN_TOP1, show_default=True,
              help="the gate: smallest top-1 agreement that passes")
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON object")
def eval_cmd(output, against, samples, num_samples, seq_len, batch_size, device, max_kld_mean, min_top1, as_json):
    """Run OUT and its source side by side through the whole model, one layer of each at a time, on held-out
    samples: KL divergence of OUT's next-token distribution from the source's, top-1 agreement, perplexity of both,
    and the hidden-state error after every layer. OUT is decoded from its stored bytes as vLLM reads it."""
    from console.commands.convert import _StderrProgress
    from engine.api import evaluate, event_sink, format_eval_report
    from engine.core.errors import ValidationFailedError

    report = evaluate(output, against, samples, num_samples=num_samples, seq_len=seq_len, batch_size=batch_size,
                      device=device, max_kld_mean=max_kld_mean, min_top1=min_top1,
                      sink=event_sink(_StderrProgress(), stage="eval"))
    click.echo(json.dumps(report, indent=2, default=str) if as_json else format_eval_report(report))
    if report["verdict"] != "pass":
        raise ValidationFailedError(f"quality gate failed: {'; '.join(report['reasons'])}",
                                    at=f"layer {report['worst_layer']}",
                                    hint="the worst layer's own error names where the output departs from the "
                                         "source; check that layer's scales (quantdeck validate --against)")


COMMANDS = (eval_cmd,)
