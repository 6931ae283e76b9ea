"""imports_without_gc: the collector off inside, restored as it was on leaving, errors included."""

from __future__ import annotations

import gc

import pytest

from engine.core.gcpause import imports_without_gc


def test_off_inside_and_restored():
    assert gc.isenabled()
    with imports_without_gc():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_restored_after_an_error_and_left_off_when_it_was_off():
    with pytest.raises(RuntimeError), imports_without_gc():
        raise RuntimeError("boom")
    assert gc.isenabled()
    gc.disable()
    try:
        with imports_without_gc():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
