"""The dashboard's key line: every shown binding, greyed when not possible now, and the palette key on the right.

One widget that redraws a line of text when the bindings change. Textual's Footer remounts a widget per key on
every change (the focus moving, a run attached, an action handed to the engine): several times during start-up,
a good part of the console's time to its first frame. Clicking a key presses it, as in the Footer.
"""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual import events
from textual.widget import Widget


class KeyBar(Widget):
    COMPONENT_CLASSES = {"key-bar--key", "key-bar--description", "key-bar--edge"}
    DEFAULT_CSS = """
    KeyBar {
        dock: bottom;
        height: 1;
        color: $footer-foreground;
        background: $footer-background;
        & > .key-bar--key { color: $footer-key-foreground; background: $footer-key-background; text-style: bold; }
        & > .key-bar--description {
            color: $footer-description-foreground;
            background: $footer-description-background;
        }
        & > .key-bar--edge { color: $foreground 20%; }
    }
    """

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self._hits: list[tuple[int, int, str, bool]] = []  # (from x, to x, key, enabled)

    def on_mount(self) -> None:
        self.screen.bindings_updated_signal.subscribe(self, self._bindings_changed)

    def on_unmount(self) -> None:
        self.screen.bindings_updated_signal.unsubscribe(self)

    def _bindings_changed(self, screen) -> None:
        self.refresh()

    def render(self) -> Text:
        text, hits, palette = self._keys(compact=False)
        if text.cell_len > self.size.width:  # 80 columns: every key still shown, closer together
            text, hits, palette = self._keys(compact=True)
        if palette is not None and self.app.ENABLE_COMMAND_PALETTE:
            tail = Text.assemble(("▏", self.get_component_rich_style("key-bar--edge")),
                                 (self.app.get_key_display(palette), self.get_component_rich_style("key-bar--key")),
                                 (f" {palette.description} ", self.get_component_rich_style("key-bar--description")))
            gap = self.size.width - text.cell_len - tail.cell_len
            if gap > 0:  # the palette hint only where it fits
                text.append(" " * gap)
                hits.append((text.cell_len, text.cell_len + tail.cell_len, palette.key, True))
                text.append_text(tail)
        self._hits = hits
        return text

    def _keys(self, compact: bool):
        key_style = self.get_component_rich_style("key-bar--key")
        desc_style = self.get_component_rich_style("key-bar--description")
        dim = Style(dim=True)
        text = Text(no_wrap=True, overflow="crop", end="")
        hits: list[tuple[int, int, str, bool]] = []
        palette = None
        for _node, binding, enabled, _tip in self.screen.active_bindings.values():
            if binding.key == self.app.COMMAND_PALETTE_BINDING:
                palette = binding
            if not binding.show:
                continue
            start = text.cell_len
            key = self.app.get_key_display(binding)
            text.append(key if compact else f" {key} ", key_style if enabled else key_style + dim)
            if binding.description:
                text.append(f" {binding.description} " if compact else f"{binding.description} ",
                            desc_style if enabled else desc_style + dim)
            hits.append((start, text.cell_len, binding.key, enabled))
        return text, hits, palette

    def on_click(self, event: events.Click) -> None:
        for start, end, key, enabled in self._hits:
            if start <= event.x < end:
                if enabled:
                    self.app.simulate_key(key)
                else:
                    self.app.bell()
                return
