"""A light table for the dashboard: keyed rows of a few cells, a header that stays on top, an optional row cursor.

Not a DataTable: a DataTable renders every cell through Rich on each repaint, which made up most of the
console's time to its first frame (4 nodes × 8 GPUs are ~35 rows × 8 cells). Here a row becomes one Strip when
its cells change and repaints reuse it; `set_rows` updates rows in place and re-renders only those that changed.
Cells are str or rich Text whose spans do not overlap (what the dashboard makes); columns are as wide as their
widest cell, one space either side.
"""

from __future__ import annotations

from rich.cells import cell_len
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip


def _width(cell: Text | str) -> int:
    return cell.cell_len if isinstance(cell, Text) else cell_len(cell)


def _same(a: Text | str, b: Text | str) -> bool:
    if isinstance(a, Text) and isinstance(b, Text):
        return a.plain == b.plain and a.spans == b.spans and a.style == b.style
    return a == b


class LineTable(ScrollView, can_focus=True):
    COLUMNS: tuple[str, ...] = ()
    COMPONENT_CLASSES = {"line-table--header", "line-table--cursor"}
    DEFAULT_CSS = """
    LineTable {
        background: $surface;
        height: auto;
        max-height: 100%;
        & > .line-table--header { text-style: bold; background: $panel; }
        & > .line-table--cursor {
            background: $block-cursor-blurred-background;
            color: $block-cursor-blurred-foreground;
            text-style: $block-cursor-blurred-text-style;
        }
        &:focus > .line-table--cursor {
            background: $block-cursor-background;
            color: $block-cursor-foreground;
            text-style: $block-cursor-text-style;
        }
    }
    """

    show_cursor = False

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self._rows: dict[str, tuple] = {}  # key → cells, in display order
        self._keys: list[str] = []
        self._widths: tuple[int, ...] = tuple(len(c) for c in self.COLUMNS)
        self._strips: dict[str, Strip] = {}  # key → rendered row; dropped when its cells or the widths change
        self._header: Strip | None = None
        self._styles: tuple[Style, Style, Style] | None = None  # base, header, cursor (rich_style is not cheap)
        self.cursor = 0

    @property
    def row_count(self) -> int:
        return len(self._keys)

    @property
    def row_keys(self) -> list[str]:
        return list(self._keys)

    def clear_rows(self) -> None:
        self._rows, self._keys, self._strips = {}, [], {}
        self.refresh()

    def set_rows(self, rows: dict[str, tuple]) -> bool:
        """Show `rows` (key → cells, in order); returns whether anything on screen changed."""
        widths = tuple(max([len(c)] + [_width(r[i]) for r in rows.values()]) for i, c in enumerate(self.COLUMNS))
        changed = list(rows) != self._keys
        if widths != self._widths:
            self._widths, self._strips, self._header, changed = widths, {}, None, True
        for key, cells in rows.items():
            old = self._rows.get(key)
            if old is None or not all(_same(a, b) for a, b in zip(cells, old, strict=False)):
                self._strips.pop(key, None)
                changed = True
        self._rows, self._keys = dict(rows), list(rows)
        self.cursor = min(self.cursor, max(len(self._keys) - 1, 0))
        self.virtual_size = Size(sum(widths) + 2 * len(widths), len(rows) + 1)
        if changed:
            self.refresh()
        return changed

    # ----------------------------------------------------------------- rendering
    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._strips, self._header, self._styles = {}, None, None

    def _get_styles(self) -> tuple[Style, Style, Style]:
        if self._styles is None:
            base = self.rich_style
            self._styles = (base, base + self.get_component_rich_style("line-table--header"),
                            base + self.get_component_rich_style("line-table--cursor"))
        return self._styles

    def _line(self, cells, style: Style) -> Strip:
        get = self.app.console.get_style
        segs: list[Segment] = []
        for cell, w in zip(cells, self._widths, strict=False):
            segs.append(Segment(" ", style))
            if isinstance(cell, Text):
                cs = style + get(cell.style) if cell.style else style
                pos, plain = 0, cell.plain
                for span in sorted(cell.spans, key=lambda sp: sp.start):
                    if span.start > pos:
                        segs.append(Segment(plain[pos:span.start], cs))
                    segs.append(Segment(plain[max(span.start, pos):span.end], cs + get(span.style)))
                    pos = max(pos, span.end)
                if pos < len(plain):
                    segs.append(Segment(plain[pos:], cs))
            elif cell:
                segs.append(Segment(cell, style))
            segs.append(Segment(" " * (w - _width(cell) + 1), style))
        return Strip(segs, sum(w + 2 for w in self._widths)).simplify()

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        base, head, cursor = self._get_styles()
        if y == 0:
            if self._header is None:
                self._header = self._line(self.COLUMNS, head)
            return self._header.crop_extend(0, width, head)
        index = self.scroll_offset.y + y - 1
        if index >= len(self._keys):
            return Strip([Segment(" " * width, base)], width)
        key = self._keys[index]
        if self.show_cursor and index == self.cursor:
            return self._line(self._rows[key], cursor).crop_extend(0, width, cursor)
        strip = self._strips.get(key)
        if strip is None:
            strip = self._strips[key] = self._line(self._rows[key], base)
        return strip.crop_extend(0, width, base)

    def row_at(self, y: int) -> int | None:
        """The row index under screen line `y` of this widget (None: the header or below the rows)."""
        index = self.scroll_offset.y + y - 1
        return index if y >= 1 and index < len(self._keys) else None

    def scroll_to_row(self, index: int) -> None:
        if not self.size.height:  # not laid out yet: nothing to scroll
            return
        top, rows = self.scroll_offset.y, max(self.size.height - 1, 1)
        if index < top:
            self.scroll_to(y=index, animate=False)
        elif index >= top + rows:
            self.scroll_to(y=index - rows + 1, animate=False)
