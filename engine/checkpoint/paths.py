"""Where an output checkpoint is built (`<dst>.partial`, renamed to `<dst>` when complete), and the refusal of an
output placed in, at or around its own source."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

from engine.core.errors import UsageError


def partial_path(dst: str | os.PathLike) -> Path:
    """The directory `dst` is built in until it is complete."""
    dst = Path(dst)
    return dst.with_name(dst.name + ".partial")


def layout_dirs(dst: str | os.PathLike, layouts: Sequence[str]) -> dict[str, Path]:
    """Each output layout's checkpoint directory: `dst` itself for one layout, `dst/<layout>` for several."""
    dst = Path(dst)
    return {layouts[0]: dst} if len(layouts) == 1 else {lay: dst / lay for lay in layouts}


def refuse_overlap(src: str | os.PathLike, dst: str | os.PathLike, outputs: Iterable[str | os.PathLike] = (), *,
                   src_name: str = "--src", dst_name: str = "--dst") -> None:
    """UsageError unless `dst` is apart from source `src`: neither the source nor inside it (the half-built output
    would be copied into itself as an extra file of the source), and the source inside none of the checkpoints
    written (`outputs`, default `dst` itself; `dst/<layout>` for several layouts) nor their `.partial` (the
    writer clears or renames what it finds there). A `dst` that only holds the source beside its outputs is fine.
    Paths are compared resolved (symlinks, `..`)."""
    s, d = Path(src).resolve(), Path(dst).resolve()
    hint = f"choose a {dst_name} outside the source directory"
    if d == s:
        raise UsageError(f"{dst_name} {dst} must differ from {src_name} {src}", at=dst_name, hint=hint)
    if d.is_relative_to(s):
        raise UsageError(f"{dst_name} {dst} is inside the source directory {src}", at=dst_name, hint=hint)
    for out in [Path(o) for o in outputs] or [Path(dst)]:
        for where in (out, partial_path(out)):
            if s.is_relative_to(where.resolve()):
                rel = "is" if s == where.resolve() else "is inside"
                raise UsageError(f"the source {src} {rel} {where}, where {dst_name} {dst} is written",
                                 at=dst_name, hint=f"{hint}, not one that contains it")
