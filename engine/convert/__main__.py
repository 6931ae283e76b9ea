"""`python -m engine.convert --src S --dst D --to nvfp4 ...`: the converter without the CLI's dependencies
(for machines with numpy and a C compiler or numba, and torch for the items that need it). Same function, same
output as `quantdeck convert`."""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

from engine.convert.device import start_early  # (no numpy, no torch: start_early's thread settings still count)
from engine.core import timeline
from engine.core.errors import QuantdeckError, exit_code_for
from engine.core.events import CallbackSink
from engine.core.procexit import end_process
from engine.startup import startfiles

START_FILES = "engine.convert"  # this entry's list of the files its start reads (engine.startup.startfiles)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.convert", description=__doc__.split("\n")[0])
    ap.add_argument("--src", required=True)
    ap.add_argument("--dst", required=True)
    ap.add_argument("--to", default="nvfp4", choices=["nvfp4", "fp8-block", "bf16"])
    ap.add_argument("--format", default="modelopt", choices=["modelopt", "compressed-tensors", "both"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--kernel-threads", type=int, default=None, help="as QUANTDECK_KERNEL_THREADS")
    ap.add_argument("--shard-size", default="5GB")
    ap.add_argument("--quantize-attention", action="store_true")
    a = ap.parse_args(argv)
    layouts = ["modelopt", "compressed-tensors"] if a.format == "both" else [a.format]
    if a.kernel_threads is not None:  # read by the kernels (and --workers children) through engine.core.settings
        os.environ["QUANTDECK_KERNEL_THREADS"] = str(a.kernel_threads)
    timeline.mark("main")

    def show(ev):
        if ev.kind == "log":
            print(f"{ev.data.get('level')}: {ev.data.get('msg')}", file=sys.stderr)

    try:  # from the start: a bad QUANTDECK_* variable (engine.core.settings) is one error line too
        # the disk reads the start's files and the source (and CUDA starts) while the imports run
        start_early(a.src, a.device, a.to, entry=START_FILES)
        gc.disable()  # no collections while (torch's) million objects load ...
        from engine.convert import convert_checkpoint

        gc.freeze()  # ... and later ones never walk them
        gc.enable()
        timeline.mark("imported")
        s = convert_checkpoint(a.src, a.dst, to=a.to, layouts=layouts, device=a.device, workers=a.workers,
                               shard_size=a.shard_size, quantize_attention=a.quantize_attention,
                               sink=CallbackSink(show))
    except QuantdeckError as e:
        print(f"quantdeck: error: {e.one_line()}", file=sys.stderr)
        return exit_code_for(e)
    if s.get("device") == "cpu":  # what this start read, for the next cold one (engine.startup.startfiles)
        startfiles.record(START_FILES)
    print(json.dumps({k: v for k, v in s.items() if k != "kept_modules"}, default=str))
    return 0


if __name__ == "__main__":
    end_process(main())  # every output file is closed and fsynced by then
