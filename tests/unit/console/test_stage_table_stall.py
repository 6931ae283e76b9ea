"""A stalled stage's row in the console's stage table: its state cell says stalled, for how long, which ranks."""

from __future__ import annotations

from console.widgets.run.stage_table import STALLED_STYLE, StageTable
from engine.api import StageView
from engine.core.names import StageState


def test_a_stalled_row_says_stalled_with_its_silence_and_quiet_ranks():
    table = StageTable()
    layers = {"unit": "layers", "done": 17, "total": 61, "world": 8}
    running = StageView("calibrate", StageState.RUNNING, attempt=1, progress=layers)
    stalled = StageView("calibrate", StageState.RUNNING, attempt=2, progress=layers, stalled=True, silent_s=912.0,
                        quiet_ranks=[{"rank": 3}, {"rank": 5}])
    assert table._cells(running)[1].plain == "running"
    cell = table._cells(stalled)[1]
    assert cell.plain == "stalled 15m12s r3,5 #2" and str(cell.style) == STALLED_STYLE
    one = StageView("convert", StageState.RUNNING, progress={"unit": "shards", "done": 1, "total": 9}, stalled=True,
                    silent_s=65.0, quiet_ranks=[{"rank": 0}])
    assert table._cells(one)[1].plain == "stalled 1m05s"
