"""Streaming checkpoint conversion (NVFP4 weight-only, FP8-block, BF16), MTP injection, extras, validation.

    from engine.convert import convert_checkpoint, validate_checkpoint, inject_mtp, copy_extras
"""

from engine.convert.extras import copy_extras
from engine.convert.streaming import convert_checkpoint, parse_size

__all__ = ["convert_checkpoint", "copy_extras", "parse_size", "inject_mtp", "validate_checkpoint"]


def __getattr__(name):  # lazy: validate pulls in transformers
    if name == "validate_checkpoint":
        from engine.convert.validate import validate_checkpoint

        return validate_checkpoint
    if name == "inject_mtp":
        from engine.convert.mtp import inject_mtp

        return inject_mtp
    raise AttributeError(name)
