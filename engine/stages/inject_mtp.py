"""The inject-mtp stage: give each MTP layer of the output the shared embedding/head (and any MTP tensor)
it lacks, through engine.convert.inject_mtp (the function `quantdeck inject-mtp` calls).

When the output already holds every MTP tensor (or the model has no MTP layer) the stage only says so.
Otherwise inject_mtp writes `<dst>.mtp` from `<dst>` plus the missing tensors (`mtp_from` = the source),
then the stage swaps it into place: `<dst>` → `<dst>.pre-mtp`, `<dst>.mtp` → `<dst>`, then removes
`<dst>.pre-mtp`. Every step is re-entrant, so a worker killed anywhere is finished by a rerun. Unit: the stage.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from engine.checkpoint.reader import CheckpointReader
from engine.core.names import StageName
from engine.stages._common import output_dirs, small
from engine.stages.base import Stage, StageContext

SCALE_SUFFIXES = (".weight_scale_inv", ".scale")


def missing_mtp(dst: Path, src: Path) -> list[str]:
    """MTP tensors the output lacks: shared embedding/head copies, and MTP-layer tensors of the source."""
    from engine.convert.mtp import mtp_prefixes, shared_sources

    out = CheckpointReader(dst)
    names = set(out.names())
    onames = set(CheckpointReader(src).names())
    prefixes = mtp_prefixes(out.config, sorted(names | onames))
    if not prefixes:
        return []
    miss = {n for n in onames if n.startswith(tuple(prefixes)) and n not in names and not n.endswith(SCALE_SUFFIXES)}
    for p in prefixes:
        miss |= {new for new in shared_sources(p, names) if new not in names}
    return sorted(miss)


def inject_into(dst: Path, src: Path, sink: Any) -> dict[str, Any]:
    from engine.convert import inject_mtp

    new, old = Path(str(dst) + ".mtp"), Path(str(dst) + ".pre-mtp")
    if not dst.exists() and old.exists() and new.exists():
        new.rename(dst)  # killed between the two renames
    if dst.exists() and not new.exists() and not old.exists():
        miss = missing_mtp(dst, src)
        if not miss:
            return {"dst": str(dst), "injected": [], "note": "every MTP tensor is already there"}
    res: dict[str, Any] = {"dst": str(dst)}
    if dst.exists() and not old.exists():
        res = inject_mtp(dst, new, mtp_from=src, sink=sink)
        dst.rename(old)
    if new.exists() and not dst.exists():
        new.rename(dst)
    if old.exists():
        shutil.rmtree(old)
    res["dst"] = str(dst)
    return res


@Stage.register(StageName.INJECT_MTP)
class InjectMtpStage(Stage):
    def run(self, ctx: StageContext) -> dict[str, Any]:
        res = {}
        for d in output_dirs(ctx.params["dst"], ctx.params.get("layouts")):
            res[str(d)] = small(inject_into(Path(d), Path(ctx.params["src"]), ctx.sink))
        return res

    def check_saved(self, ctx: StageContext) -> list[str]:
        out = []
        for d in output_dirs(ctx.params["dst"], ctx.params.get("layouts")):
            for leftover in (Path(str(d) + ".mtp"), Path(str(d) + ".pre-mtp")):
                if leftover.exists():
                    out.append(f"{leftover} is left from an unfinished inject-mtp (resume finishes it)")
        return out
