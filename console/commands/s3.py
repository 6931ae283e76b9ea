"""`quantdeck s3 pull|push`: the same engine functions the pull and push stages call, from a shell.

Progress goes to stderr; stdout gets one JSON line with what was moved (objects, bytes, retries, seconds).
"""

from __future__ import annotations

import json
import re
import sys
import time

import click

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000 ** 2, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1000 ** 3, "gib": 1 << 30}


def parse_size(text: str) -> int:
    """'64MiB', '64M', '8mb', '67108864' → bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise click.BadParameter(f"{text!r} is not a size (e.g. 64MiB, 8M, 67108864)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class _SizeType(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except click.BadParameter as e:
            self.fail(str(e.message), param, ctx)


class _StderrProgress:
    """An EventSink that prints progress and warnings to stderr, at most every `interval` seconds."""

    def __init__(self, quiet: bool, interval: float = 1.0):
        self.quiet, self.interval, self._last = quiet, interval, 0.0

    def emit(self, kind: str, **d) -> None:
        if self.quiet:
            return
        if kind == "log" and d.get("level") in ("info", "warning", "error"):
            click.echo(f"[{d.get('level')}] {d.get('msg')}", err=True)
        elif kind == "progress":
            now = time.monotonic()
            if d.get("done") != d.get("total") and now - self._last < self.interval:
                return
            self._last = now
            rate = (d.get("rate") or 0) / (1 << 20)
            eta = d.get("eta_s")
            click.echo(f"  {d.get('done')}/{d.get('total')} objects, {(d.get('bytes_done') or 0) / (1 << 20):.1f}/"
                       f"{(d.get('bytes_total') or 0) / (1 << 20):.1f} MiB, {rate:.1f} MiB/s"
                       + (f", ETA {eta:.0f}s" if eta else ""), err=True)


def _options(f):
    f = click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")(f)
    f = click.option("--retries", type=int, default=None, help="Retries per object and per request [4].")(f)
    f = click.option("--manifest", type=click.Path(dir_okay=False), default=None,
                     help="Transfer manifest path [a hidden file beside the local directory].")(f)
    f = click.option("--profile", default=None, help="AWS profile (else the standard credential chain).")(f)
    f = click.option("--part-concurrency", type=int, default=None, help="Parts of one object at once [8].")(f)
    f = click.option("--concurrency", "-j", type=int, default=None, help="Objects at once [8].")(f)
    f = click.option("--part-size", type=_SizeType(), default=None, help="Multipart part size [64MiB; min 5MiB].")(f)
    f = click.option("--endpoint-url", default=None,
                     help="S3-compatible endpoint, e.g. http://minio:9000 [AWS_ENDPOINT_URL or AWS].")(f)
    return f


def _kwargs(**kw):
    return {k: v for k, v in kw.items() if v is not None}


@click.group("s3")
def s3() -> None:
    """Pull and push checkpoints to S3: parallel, resumable, verified."""


@s3.command("pull")
@click.argument("url")
@click.argument("dst", type=click.Path(file_okay=False))
@_options
@click.option("--reserve", type=_SizeType(), default=None,
              help="Disk space to leave free after the pull (checked before transferring) [0].")
def pull_cmd(url, dst, reserve, endpoint_url, part_size, concurrency, part_concurrency, profile, manifest, retries,
             quiet):
    """Download every object under URL (s3://bucket/prefix) into DST (built in DST.partial, then renamed)."""
    from engine.api import s3_pull

    res = s3_pull(url, dst, sink=_StderrProgress(quiet), **_kwargs(
        endpoint_url=endpoint_url, part_size=part_size, concurrency=concurrency, part_concurrency=part_concurrency,
        profile=profile, manifest=manifest, retries=retries, reserve_bytes=reserve))
    click.echo(json.dumps(res.summary()))
    sys.stdout.flush()


@s3.command("push")
@click.argument("src", type=click.Path(file_okay=False, exists=True))
@click.argument("url")
@_options
def push_cmd(src, url, endpoint_url, part_size, concurrency, part_concurrency, profile, manifest, retries, quiet):
    """Upload every file under SRC to URL (s3://bucket/prefix): shards first, index and configs last."""
    from engine.api import s3_push

    res = s3_push(src, url, sink=_StderrProgress(quiet), **_kwargs(
        endpoint_url=endpoint_url, part_size=part_size, concurrency=concurrency, part_concurrency=part_concurrency,
        profile=profile, manifest=manifest, retries=retries))
    click.echo(json.dumps(res.summary()))


COMMANDS = (s3,)
