"""What the driver starts ahead of a stage (engine.runs.runner): later stages' workers, and validate's warm
decoder-block child.

As a stage starts, the launcher is asked to start later stages' workers ahead (`Launcher.prepare`; the local
launcher's standby), so their interpreter start-up and imports (~0.3 s) overlap this stage instead of following it.
Beside a heavy stage on 2 cores, standbys for every stage up to validate (to cover the short stages after it) slowed
convert by ~0.3 s: validate's worker imports torch. The short stages' workers import no torch (~0.35 s each), and
theirs beside convert cost it ~0.07 s. So beside a heavy stage the short stages' standbys (inject-mtp, copy-extras)
start together, and the stage after them (validate) too on 8 cores or more, else beside the first short stage
(`stages_ahead`). Started one by one, each short stage waited for the next one's imports: 0.53 s between inject-mtp
and copy-extras on 2 cores, and the mid-cpu run took 7.6-8.1 s against 7.2-7.8 s now (alternating).

validate's decoder-block child (engine.convert.block_child.start_warm) imports torch and transformers, seconds of
work: it starts beside the last stage that writes the output where there are cores to spare, else after it
(`warm_block_stage`).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from engine.core.names import StageName
from engine.runs.launcher import Launcher
from engine.runs.plan import Plan
from engine.runs.rundir import RunDir

WARM_BESIDE_HEAVY_CORES = 8


# stages of a fraction of a second (a few small files): a standby started as one of them begins has no time to import
LIGHT = frozenset(x.value for x in (StageName.INSPECT, StageName.INJECT_MTP, StageName.COPY_EXTRAS))


def stages_ahead(todo: list[str], i: int) -> list[str]:
    """The stages whose workers are started ahead as stage `todo[i]` begins: the next one and, where that is light,
    the light ones after it and the first stage after those (their standbys then import beside this stage, not one
    by one in the gaps between light stages). Beside a heavy stage on fewer than 8 cores, not that first stage after
    the light ones: its imports would slow the heavy one (see the module doc)."""
    out = todo[i + 1:i + 2]
    spare = todo[i] in LIGHT or (os.cpu_count() or 1) >= WARM_BESIDE_HEAVY_CORES
    for name in todo[i + 2:]:
        if out[-1] not in LIGHT or not (spare or name in LIGHT):
            break
        out.append(name)
    return out


# the stages that write the output (or what it is made from): the warm child starts after the last of them
HEAVY = frozenset(x.value for x in (StageName.PULL, StageName.CONVERT, StageName.DEQUANT, StageName.CAST_FP8,
                                    StageName.CALIBRATE, StageName.EXPORT))


def warm_block_stage(plan: Plan, todo: list[str], launcher: Launcher) -> str | None:
    """The stage beside whose worker validate's decoder-block child starts warming up
    (engine.convert.block_child.start_warm): the last heavy stage of `todo` on a machine of 8 cores or more, else
    the first stage after it, if before validate;
    None when validate is not to run here (another launcher, not in `todo`, nothing before it, no source)."""
    v = StageName.VALIDATE.value
    if launcher.name != "local" or v not in todo or not plan.stage(v).params.get("src"):
        return None
    last = max((i for i, n in enumerate(todo) if n in HEAVY), default=-1)
    # with cores to spare its imports overlap the heavy stage itself; on a few cores they would slow it (2 cores:
    # convert 2.2 -> 3.4 s for validate's 0 s gain), so it starts with the next stage
    at = last if last >= 0 and (os.cpu_count() or 1) >= WARM_BESIDE_HEAVY_CORES else last + 1
    return todo[at] if at < todo.index(v) else None


def start_warm_block(run: RunDir, plan: Plan) -> Any:
    """validate's decoder-block child, warming up; None where it cannot start (validate then starts its own)."""
    from engine.convert.block_child import WARM_SOCKET, start_warm
    from engine.stages.validate import block_check_args

    v = StageName.VALIDATE.value
    args = block_check_args(plan.stage(v).params)
    if args is None:
        return None
    try:
        run.stage_dir(v).mkdir(parents=True, exist_ok=True)
        warm = start_warm(run.stage_dir(v) / WARM_SOCKET, *args)
    except Exception as e:  # noqa: BLE001 - only a head start: validate starts its own child without it
        print(f"quantdeck runner: validate's decoder-block check not warmed up: {e}", file=sys.stderr, flush=True)
        return None
    if warm is not None:
        print(f"quantdeck runner: validate's decoder-block check warming up (pid {warm.proc.pid}, run {run.id})",
              file=sys.stderr, flush=True)
    return warm
