"""`quantdeck inspect DIR [--json]`: what a checkpoint holds, from its headers alone."""

from __future__ import annotations

import json

import click


@click.command("inspect")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="one JSON object on stdout")
@click.option("--strict", is_flag=True, help="exit non-zero (4) when an anomaly of severity error is found")
def inspect_cmd(path, as_json, strict):
    """Show family, layout, tensor patterns, block formats, counts, sizes and anomalies of a checkpoint."""
    from engine.api import inspect_checkpoint, render_inspection
    from engine.core.errors import ValidationFailedError

    rep = inspect_checkpoint(path)
    click.echo(json.dumps(rep.to_json(), indent=2) if as_json else render_inspection(rep))
    if strict and not rep.ok:
        first = next(a for a in rep.anomalies if a.severity == "error")
        errors = sum(a.severity == "error" for a in rep.anomalies)
        raise ValidationFailedError(f"{errors} anomalies, first: {first.msg}", at=first.at, hint=first.hint or None)


COMMANDS = (inspect_cmd,)
