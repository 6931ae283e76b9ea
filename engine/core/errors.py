"""Every exception quantdeck raises on purpose.

Each carries the message, a short title, the thing at fault (a path, a tensor, a host, a stage, a field)
and a hint: the next thing to try. The CLI turns them into one stderr line and an exit code; the console
into an error modal. Anything that is not a QuantdeckError is a bug and keeps its traceback.
"""

from __future__ import annotations

from contextlib import contextmanager
from enum import IntEnum
from typing import Iterator


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2
    INPUT = 3  # bad recipe, samples file, checkpoint
    VALIDATION = 4  # a produced artifact failed validation
    PREFLIGHT = 5
    REMOTE = 6
    CONFLICT = 7  # a live worker already owns the stage
    INTERRUPTED = 130


class QuantdeckError(Exception):
    """Base of every deliberate error. `at` names the thing at fault; `hint` says what to do."""

    title = "quantdeck error"
    exit_code = ExitCode.ERROR

    def __init__(self, msg: str, *, at: str | None = None, hint: str | None = None, title: str | None = None):
        super().__init__(msg)
        self.msg = msg
        self.at = at
        self.hint = hint
        if title is not None:
            self.title = title

    def one_line(self) -> str:
        where = f"{self.at}: " if self.at and self.at not in self.msg else ""
        hint = f" (hint: {self.hint})" if self.hint else ""
        return f"{where}{self.msg}{hint}"

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.one_line()


class UsageError(QuantdeckError):
    title = "bad usage"
    exit_code = ExitCode.USAGE


class SettingsError(QuantdeckError):
    """An environment variable holds a value quantdeck cannot read (engine.core.settings); `at` names it. Not a
    UsageError: code that expects a bad argument must not swallow it."""

    title = "bad setting"
    exit_code = ExitCode.USAGE


class RecipeError(QuantdeckError):
    """A recipe failed to load; `at` is 'file:key'."""

    title = "bad recipe"
    exit_code = ExitCode.INPUT


class CheckpointError(QuantdeckError):
    """A checkpoint is missing, inconsistent or holds something unsupported; `at` names file and tensor."""

    title = "bad checkpoint"
    exit_code = ExitCode.INPUT


class FormatError(QuantdeckError):
    """A tensor cannot be encoded/decoded in the asked format (shape, dtype, scale)."""

    title = "format error"
    exit_code = ExitCode.INPUT


CORRUPT_SOURCE = ("check this tensor in the source; a damaged shard is re-downloaded (`quantdeck inspect` reads "
                  "headers only)")


@contextmanager
def about(tensor: str) -> Iterator[None]:
    """Name `tensor` as the thing at fault in a FormatError raised inside: the numerics see arrays, and their
    errors name the function (`fp8_block_amax`), which tells an operator nothing."""
    try:
        yield
    except FormatError as e:
        if not e.at or tensor not in e.at:
            e.at = tensor
            e.hint = e.hint or CORRUPT_SOURCE
        raise


class SamplesError(QuantdeckError):
    title = "bad samples file"
    exit_code = ExitCode.INPUT


class ValidationFailedError(QuantdeckError):
    title = "validation failed"
    exit_code = ExitCode.VALIDATION


class QualityGateError(ValidationFailedError):
    """The output failed the eval stage's quality gate (its KL divergence or top-1 agreement against the source)."""

    title = "quality gate failed"


class PreflightError(QuantdeckError):
    """One or more preflight checks failed; `failures` holds one line each."""

    title = "preflight failed"
    exit_code = ExitCode.PREFLIGHT

    def __init__(self, msg: str, *, failures: list[str] | None = None, **kw):
        super().__init__(msg, **kw)
        self.failures = list(failures or [])


class RunError(QuantdeckError):
    """A run or stage is unknown, or asked to do what its state forbids."""

    title = "run error"


class StageLockedError(RunError):
    """A live worker already holds the stage's lock."""

    title = "stage busy"
    exit_code = ExitCode.CONFLICT


class StageFailedError(RunError):
    title = "stage failed"


class DiskFullError(QuantdeckError):
    title = "disk full"


class RankFailedError(QuantdeckError):
    """Another rank of a stage split over torchrun ranks failed; `at` is "rank N on HOST", `error_class` the
    failing rank's exception class name (its own message is in msg, so the root cause classifies it)."""

    title = "a rank failed"

    def __init__(self, msg: str, *, rank: int = -1, host: str = "", error_class: str = "", **kw):
        super().__init__(msg, **kw)
        self.rank, self.host, self.error_class = rank, host, error_class


class RemoteError(QuantdeckError):
    """SSH, host keys, unreachable nodes. `at` names the host."""

    title = "remote error"
    exit_code = ExitCode.REMOTE


class HostKeyError(RemoteError):
    title = "unknown host key"


class TransferError(QuantdeckError):
    """S3 pull/push failures. Never carries credentials."""

    title = "transfer failed"


class KernelsUnavailableError(QuantdeckError):
    """Neither CPU kernel technology can run: the C kernels did not build and numba is not installed."""

    title = "no CPU kernels"


class RegistryError(QuantdeckError):
    title = "unknown name"
    exit_code = ExitCode.USAGE


def exit_code_for(err: BaseException) -> int:
    """The process exit code for an error that reached the CLI."""
    if isinstance(err, QuantdeckError):
        return int(err.exit_code)
    if isinstance(err, KeyboardInterrupt):
        return int(ExitCode.INTERRUPTED)
    return int(ExitCode.ERROR)
