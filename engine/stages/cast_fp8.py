"""The cast-fp8 stage: BF16 → DeepSeek FP8 block-128, engine.convert.convert_checkpoint(to="fp8-block")."""

from __future__ import annotations

from engine.core.names import StageName
from engine.stages.base import Stage
from engine.stages.convert import _ConvertBase


@Stage.register(StageName.CAST_FP8)
class CastFp8Stage(_ConvertBase):
    to = "fp8-block"
