"""The dequant stage: exact FP8 / MXFP4 → BF16, engine.convert.convert_checkpoint(to="bf16")."""

from __future__ import annotations

from engine.core.names import StageName
from engine.stages.base import Stage
from engine.stages.convert import _ConvertBase


@Stage.register(StageName.DEQUANT)
class DequantStage(_ConvertBase):
    to = "bf16"
