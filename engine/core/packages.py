"""Installed distributions' versions, read from their metadata without importing them."""

from __future__ import annotations


def installed_version(dist: str) -> str | None:
    """The installed version of distribution `dist` (e.g. "nvidia-modelopt"); None where it is not installed."""
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None
