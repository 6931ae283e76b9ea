from console.models import HistoryRow
from console.screens.history import row_matches

ROW = HistoryRow("20261122-0231-a1b2", 1_763_780_000.0, "3f9c2a1d", "DeepSeek-V3", "nvfp4 W4A4", "512",
                 "FAILED", "cuda-oom", "batch 8 → 2")


def test_every_word_must_match_somewhere():
    assert row_matches(ROW, "")
    assert row_matches(ROW, "failed oom")
    assert row_matches(ROW, "DEEPSEEK 3f9c")
    assert not row_matches(ROW, "failed succeeded")
