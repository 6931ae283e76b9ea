"""A stalled stage's row in the console's stage table: its state cell says stalled, for how long, which ranks."""

from __future__ import annotations

from console.models import StageView
from console.widgets.run.stage_table import STALLED_STYLE, StageTable


def test_a_stalled_row_says_stalled_with_its_silence_and_quiet_ranks():
    table = StageTable()
    running = StageView("calibrate", "RUNNING", "layers", 17, 61, ranks=8, attempt=1)
    stalled = StageView("calibrate", "RUNNING", "layers", 17, 61, ranks=8, attempt=2, stalled=True, silent_s=912.0,
                        quiet_ranks=(3, 5))
    assert table._cells(running)[1].plain == "running"
    cell = table._cells(stalled)[1]
    assert cell.plain == "stalled 15m12s r3,5 #2" and str(cell.style) == STALLED_STYLE
    one = StageView("convert", "RUNNING", "shards", 1, 9, stalled=True, silent_s=65.0, quiet_ranks=(0,))
    assert table._cells(one)[1].plain == "stalled 1m05s"
