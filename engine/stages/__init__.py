"""One module per stage. Each registers a Stage subclass by its StageName; the worker looks them up by name.

Importing this package imports every stage module so that each registers (modules import heavy
libraries lazily, inside run()).
"""

from __future__ import annotations

import importlib
import pkgutil

from engine.stages.base import Stage, StageContext

__all__ = ["Stage", "StageContext", "load_all"]


def load_all() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base":
            importlib.import_module(f"{__name__}.{mod.name}")
