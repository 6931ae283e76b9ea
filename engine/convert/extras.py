"""copy-extras: every non-safetensors file of a source checkpoint (tokenizer, generation config, code, docs)
copied into an output checkpoint that lacks it. Files the output already has are kept:
its config.json and hf_quant_config.json are its own.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from engine.checkpoint.manifest import LOCK_NAME, MANIFEST_NAME
from engine.checkpoint.reader import INDEX_NAME
from engine.checkpoint.write_errors import disk_full
from engine.core.errors import CheckpointError
from engine.core.events import EventSink, NullSink

SKIP = {INDEX_NAME, MANIFEST_NAME, LOCK_NAME, "hf_quant_config.json"}


def extra_files(src: str | os.PathLike) -> list[Path]:
    """Relative paths of the files copy_extras would copy (sorted)."""
    src = Path(src)
    out = []
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if p.is_dir() or rel.parts[0].startswith(".cache") or p.suffix == ".safetensors":
            continue
        if p.name.endswith(".partial") or (len(rel.parts) == 1 and p.name in SKIP):
            continue
        out.append(rel)
    return out


def copy_extras(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
                sink: EventSink = NullSink()) -> list[str]:
    """Copy the source's non-safetensors files into `dst`; returns what was copied."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"source {src} is not a directory", at=str(src), hint="check the path")
    if not dst.is_dir():
        raise CheckpointError(f"destination {dst} is not a directory", at=str(dst), hint="convert first")
    copied = []
    for rel in extra_files(src):
        target = dst / rel
        if target.exists() and not overwrite:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp.{os.getpid()}")
        try:
            shutil.copy2(src / rel, tmp)
            os.chmod(tmp, os.stat(tmp).st_mode | 0o200)  # the output is the operator's: keep it writable
            with open(tmp, "rb") as fh:  # small files, on the disk before the output is complete (no digest of theirs)
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except OSError as e:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:  # a read-only filesystem refuses even that
                pass
            full = disk_full(e, target)
            if full is not e:
                raise full from e
            raise CheckpointError(f"cannot copy {src / rel} to {target}: {e.strerror or e}", at=str(target),
                                  hint="check that the source file can be read and the output written, then run "
                                       "the same command again") from e
        copied.append(str(rel))
    if copied:
        sink.emit("log", level="info", msg=f"copied {len(copied)} extra file(s) from {src}")
    return copied
