"""The names that recipe, registries, run dirs and the store spell alike."""

from __future__ import annotations

from enum import Enum


class StrEnum(str, Enum):
    def __str__(self) -> str:
        return self.value


class Family(StrEnum):
    DEEPSEEK_V3 = "deepseek-v3"
    DEEPSEEK_V4 = "deepseek-v4"
    GENERIC = "generic"


class TargetFormat(StrEnum):
    NVFP4 = "nvfp4"
    FP8_BLOCK = "fp8-block"
    BF16 = "bf16"


class OutputLayout(StrEnum):
    MODELOPT = "modelopt"
    COMPRESSED_TENSORS = "compressed-tensors"


class StageName(StrEnum):
    PULL = "pull"
    INSPECT = "inspect"
    DEQUANT = "dequant"
    CAST_FP8 = "cast-fp8"
    CONVERT = "convert"
    CALIBRATE = "calibrate"
    EXPORT = "export"
    INJECT_MTP = "inject-mtp"
    COPY_EXTRAS = "copy-extras"
    VALIDATE = "validate"
    EVAL = "eval"
    PUSH = "push"


class StageState(StrEnum):
    """Ordered: a later member is never replaced by an earlier one on reconciliation."""

    PENDING = "PENDING"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    FAILED_WORKER = "FAILED_WORKER"  # the worker process vanished without saying why
    CANCELLED = "CANCELLED"
    SKIPPED = "SKIPPED"

    def is_terminal(self) -> bool:
        return self in (
            StageState.SUCCEEDED,
            StageState.FAILED,
            StageState.FAILED_WORKER,
            StageState.CANCELLED,
            StageState.SKIPPED,
        )

    def is_done(self) -> bool:
        return self in (StageState.SUCCEEDED, StageState.SKIPPED)


# The `format` of a calibration's amax snapshot manifest (engine.calibrate.snapshot), told apart from a checkpoint's
# manifest without importing the calibration (and torch).
SNAPSHOT_FORMAT = "quantdeck-amax/1"
