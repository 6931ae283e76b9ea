"""Ending a process without the interpreter's teardown.

A process that imported torch spends time at exit in module teardown and destructors: torch's and the CUDA
context's, and ~1.2 s on 2 cores more where transformers and modelopt are imported too (measured: the same imports
ended with and without it). Processes that have nothing left to write once their work returns (every output file
closed by then, made durable where it must be) end with `end_process`: standard output and error flushed, then
gone. The driver of a run and the CLI's commands that imported no torch keep the normal exit.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import NoReturn


def end_process(code: int) -> NoReturn:
    """Flush standard output and error, then end this process with `code`, skipping the interpreter's teardown
    (atexit handlers, module and object finalizers, non-daemon threads): the caller has closed what it wrote."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken stream: nothing more to save in it
            stream.flush()
    os._exit(code)
