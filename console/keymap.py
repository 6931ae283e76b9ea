"""Keys → action names. A user keymap (QUANTDECK_HOME/keymap.toml, `[keys] resume = "R"`) overrides defaults."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from textual.binding import Binding

from console.actions import ACTIONS
from engine.core.settings import settings


@dataclass(frozen=True)
class KeyBinding:
    key: str
    action: str  # a name from console.actions.ACTIONS


def default_keymap() -> tuple[KeyBinding, ...]:
    return tuple(KeyBinding(a.key, a.name) for a in ACTIONS.values())


def load_keymap(path: Path | None = None) -> tuple[KeyBinding, ...]:
    """Defaults, overridden by `[keys]` in keymap.toml; an unknown action name is ignored, not fatal."""
    keys = {a.name: a.key for a in ACTIONS.values()}
    home = settings().home
    if path is None and home:
        path = Path(home) / "keymap.toml"
    if path is not None and path.is_file():
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError):
            data = {}
        for name, key in (data.get("keys") or {}).items():
            if name in keys and isinstance(key, str) and key:
                keys[name] = key
    return tuple(KeyBinding(k, n) for n, k in keys.items())


def to_bindings(keymap: tuple[KeyBinding, ...]) -> list[Binding]:
    out = []
    for kb in keymap:
        a = ACTIONS[kb.action]
        out.append(Binding(kb.key, a.name.replace("-", "_"), a.label, show=a.show, priority=a.priority))
    return out
