"""Root-cause classifier: a failure (exception, traceback/log tail, exit signal) → a known class + one-line hint.

Classes (their names go verbatim into status.json `error_class` and the store's root cause):
    cuda-oom, host-oom, killed, illegal-memory-access, nccl-timeout (a collective of NCCL or gloo timed out),
    stalled (the stage went silent, then its worker ended), disk-full, file-missing, bad-samples, ssh-lost,
    interrupted, quality-gate (eval's gate failed), validation-failed, bad-checkpoint, error (any other
    QuantdeckError, with its own hint), worker-lost, unknown
"""

from __future__ import annotations

import re
import signal as _signal
from dataclasses import dataclass

from engine.core.errors import (
    CheckpointError,
    DiskFullError,
    QualityGateError,
    QuantdeckError,
    SamplesError,
    ValidationFailedError,
)


@dataclass(frozen=True)
class RootCause:
    cls: str
    summary: str  # one line: what happened
    hint: str  # one line: what to do

    def to_json(self) -> dict[str, str]:
        return {"error_class": self.cls, "error": self.summary, "hint": self.hint}


# (class, pattern over the text, summary, hint) — first match wins, so the specific come first.
RULES: list[tuple[str, re.Pattern[str], str, str]] = [
    ("cuda-oom", re.compile(r"CUDA out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED|"
                            r"cudaErrorMemoryAllocation", re.I),
     "CUDA out of memory",
     "lower calibration.batch_size or seq_len, or use more GPUs/nodes; stages stream one layer at a time"),
    ("illegal-memory-access", re.compile(r"illegal memory access|cudaErrorIllegalAddress|CUDA error: an illegal", re.I),
     "CUDA illegal memory access",
     "resume: finished layers/shards are kept; if it repeats, check the driver and GPU health (nvidia-smi -q)"),
    ("nccl-timeout", re.compile(r"NCCL.*(timeout|timed out)|Watchdog caught collective operation timeout|"
                                r"ProcessGroupNCCL.*Timeout", re.I),
     "NCCL collective timed out",
     "a rank died or stalled: check every node's log (`quantdeck logs RUN calibrate`), then resume"),
    ("nccl-timeout", re.compile(r"Timed out waiting \d+ ?ms for (recv|send)|gloo.*(timeout|timed out)|"
                                r"Timed out after \d+ seconds waiting for clients", re.I),
     "collective timed out (gloo): a rank did not join in time",
     "a rank died or stalled: check every rank's log (`quantdeck logs RUN STAGE`), then `quantdeck resume RUN`"),
    ("disk-full", re.compile(r"No space left on device|ENOSPC|Errno 28|DiskFullError|disk full", re.I),
     "disk full",
     "free space at the output/work dir (see `df -h`), then `quantdeck resume`"),
    ("bad-samples", re.compile(r"SamplesError|bad samples file|samples file", re.I),
     "bad samples file",
     "fix calibration.samples (JSON list of strings, or JSONL with text/messages); preflight checks it"),
    ("ssh-lost", re.compile(r"SSHException|Socket is closed|Connection reset by peer|connection lost|"
                            r"No existing session|EOF during negotiation", re.I),
     "SSH connection lost",
     "the worker keeps running on its node; `quantdeck status RUN` re-attaches, `quantdeck resume RUN` if it died"),
    ("host-oom", re.compile(r"MemoryError|Cannot allocate memory|oom-kill|Out of memory: Killed process|"
                            r"std::bad_alloc", re.I),
     "host out of memory",
     "lower workers/batch size, or use a node with more RAM; finished units are kept on resume"),
    ("file-missing", re.compile(r"FileNotFoundError|No such file or directory", re.I),
     "a file is missing",
     "check the path named above (source, samples, amax snapshot) exists on every node, then resume"),
    ("interrupted", re.compile(r"KeyboardInterrupt|cancelled by operator|SIGINT|SIGTERM", re.I),
     "interrupted by the operator",
     "`quantdeck resume RUN` continues from the first unit not done"),
]

HINTS = {r[0]: r[3] for r in RULES}
HINTS.update({
    "stalled": "a rank went silent (hung collective, stuck I/O, a stopped process): read its log "
               "(`quantdeck logs RUN STAGE`), then `quantdeck resume RUN` continues from the last finished unit",
    "killed": "killed by a signal (SIGKILL: often the host OOM killer — see `dmesg`); `quantdeck resume RUN`",
    "worker-lost": "the worker vanished without a final status; check its log, then `quantdeck resume RUN`",
    "bad-checkpoint": "fix the checkpoint or path named above, then `quantdeck resume RUN`",
    "validation-failed": "the output failed validation: read stages/validate/report.json "
                         "(`quantdeck logs RUN validate`)",
    "unknown": "read the log (`quantdeck logs RUN STAGE`); `quantdeck resume RUN` once fixed",
})


def last_traceback_line(text: str) -> str:
    """The last exception line of a traceback in `text` (or its last non-empty line)."""
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", ln.strip()):
            return ln.strip()[:300]
    return lines[-1].strip()[:300] if lines else ""


def classify_text(text: str) -> RootCause | None:
    for cls, pat, summary, hint in RULES:
        m = pat.search(text)
        if m:
            return RootCause(cls, summary, hint)
    return None


def classify(text: str = "", *, exit_code: int | None = None, exc: BaseException | None = None) -> RootCause:
    """Classify a failure from an exception, a traceback/log tail and/or the process's exit code
    (negative = killed by that signal, as subprocess reports it)."""
    if exc is not None:
        if isinstance(exc, QualityGateError):
            return RootCause("quality-gate", _one(exc), exc.hint or HINTS["validation-failed"])
        if isinstance(exc, DiskFullError):
            return RootCause("disk-full", _one(exc), HINTS["disk-full"])
        if isinstance(exc, ValidationFailedError):
            return RootCause("validation-failed", _one(exc), HINTS["validation-failed"])
        if isinstance(exc, SamplesError):
            return RootCause("bad-samples", _one(exc), HINTS["bad-samples"])
        if isinstance(exc, (KeyboardInterrupt,)):
            return RootCause("interrupted", "interrupted by the operator", HINTS["interrupted"])
        if isinstance(exc, OSError) and exc.errno == 28:
            return RootCause("disk-full", _one(exc), HINTS["disk-full"])
        if isinstance(exc, MemoryError):
            return RootCause("host-oom", "host out of memory (MemoryError)", HINTS["host-oom"])
        if isinstance(exc, CheckpointError):
            return RootCause("bad-checkpoint", _one(exc), exc.hint or HINTS["bad-checkpoint"])
        if isinstance(exc, QuantdeckError):
            found = classify_text(exc.msg)
            if found is None:
                return RootCause("error", _one(exc), exc.hint or HINTS["unknown"])
        text = f"{type(exc).__name__}: {exc}\n{text}"
    found = classify_text(text) if text else None
    if found is not None:
        detail = last_traceback_line(text) if exc is None else _one(exc)
        return RootCause(found.cls, f"{found.summary}: {detail}" if detail else found.summary, found.hint)
    sig = _signal_of(exit_code)
    if sig is not None:
        name = _sig_name(sig)
        if sig == _signal.SIGKILL:
            return RootCause("killed", f"worker killed by {name} (host OOM killer or kill -9)", HINTS["killed"])
        if sig in (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP):
            return RootCause("interrupted", f"worker stopped by {name}", HINTS["interrupted"])
        return RootCause("killed", f"worker killed by {name}", HINTS["killed"])
    if exc is not None:
        return RootCause("unknown", _one(exc), HINTS["unknown"])
    line = last_traceback_line(text) if text else ""
    if exit_code is None and not line:
        return RootCause("worker-lost", "worker vanished without a final status", HINTS["worker-lost"])
    what = line or f"worker exited with code {exit_code}"
    return RootCause("unknown", what, HINTS["unknown"])


def stalled_cause(stall: str, then: RootCause) -> RootCause:
    """The root cause of a worker that ended while its stage was stalled: the stall (`stall`, one line naming
    the stage and its silent ranks), with how the worker then ended (`then`)."""
    return RootCause("stalled", f"{stall}; then {then.summary}", HINTS["stalled"])


def _signal_of(exit_code: int | None) -> int | None:
    if exit_code is None:
        return None
    if exit_code < 0:
        return -exit_code
    if exit_code > 128 and exit_code - 128 in {s.value for s in _signal.Signals}:
        return exit_code - 128  # a shell's convention (setsid nohup … on a remote node)
    return None


def _sig_name(sig: int) -> str:
    try:
        return _signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _one(exc: BaseException) -> str:
    text = exc.msg if isinstance(getattr(exc, "msg", None), str) else str(exc)
    return f"{type(exc).__name__}: {text}".splitlines()[0][:300] if text else type(exc).__name__
