"""Name → class registries (layouts, model layouts, stages), in the manner of compressed-tensors.

Names are standardized to lowercase kebab-case; registering a taken name raises; looking up an unknown
name raises and lists the registered ones.
"""

from __future__ import annotations

from enum import Enum
from typing import Callable, ClassVar, TypeVar

from engine.core.errors import RegistryError

T = TypeVar("T", bound=type)


def standardize_name(name: str | Enum) -> str:
    raw = name.value if isinstance(name, Enum) else str(name)
    return raw.strip().lower().replace("_", "-").replace(" ", "-")


class Registry:
    """Mixin: subclasses of a class that inherits it share one table per direct registry base."""

    _registry: ClassVar[dict[str, type]]
    registry_kind: ClassVar[str] = "name"

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if Registry in cls.__bases__:
            cls._registry = {}

    @classmethod
    def register(cls, name: str | Enum) -> Callable[[T], T]:
        key = standardize_name(name)

        def deco(sub: T) -> T:
            if key in cls._registry:
                raise RegistryError(
                    f"{cls.registry_kind} {key!r} is already registered by {cls._registry[key].__qualname__}",
                    at=key,
                )
            cls._registry[key] = sub
            sub.registered_name = key  # type: ignore[attr-defined]
            return sub

        return deco

    @classmethod
    def get(cls, name: str | Enum) -> type:
        key = standardize_name(name)
        try:
            return cls._registry[key]
        except KeyError:
            known = ", ".join(sorted(cls._registry)) or "(none)"
            raise RegistryError(
                f"unknown {cls.registry_kind} {key!r}; known: {known}", at=key, hint=f"use one of: {known}"
            ) from None

    @classmethod
    def names(cls) -> list[str]:
        return sorted(cls._registry)
