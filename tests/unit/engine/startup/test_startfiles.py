"""engine.startup.startfiles: the files a converter's start reads, recorded after a run for the next cold start."""

from __future__ import annotations

import os
import sys

import numpy

from engine.startup import startfiles


def test_records_what_this_process_loaded_once_per_kind_and_interpreter(tmp_path):
    files = startfiles.loaded_files()
    core = os.path.realpath(numpy._core._multiarray_umath.__file__)
    assert core in files and os.path.realpath(sys.executable) in files
    read = startfiles.__cached__ if os.path.isfile(startfiles.__cached__) else startfiles.__file__
    assert os.path.realpath(read) in files  # a module: its bytecode where it was written, else its source
    assert files == sorted(set(files)) and all(os.path.isfile(f) for f in files)
    assert startfiles.listed("a") == []
    assert startfiles.record("a") is True
    assert startfiles.record("a") is False  # the same list: not written again
    assert set(startfiles.listed("a")) <= set(startfiles.loaded_files())
    assert startfiles.listed("b") == [] and startfiles.list_path("a") != startfiles.list_path("b")


def test_a_broken_or_unwritable_list_costs_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTDECK_START_FILES", str(tmp_path / "lists"))
    path = startfiles.list_path("a")
    path.parent.mkdir()
    path.write_bytes(b"\\xff\\xfe not text")
    assert startfiles.listed("a") == []
    path.unlink()
    path.parent.chmod(0o500)
    try:
        if os.access(path.parent, os.W_OK):  # root ignores the mode
            return
        assert startfiles.record("a") is False and not path.exists()
    finally:
        path.parent.chmod(0o700)


def test_an_odd_module_never_fails_the_record(monkeypatch):
    """A module whose own __getattr__ raises, or a path with a newline in it: the conversion has succeeded."""
    import types

    class Odd(types.ModuleType):
        def __getattr__(self, name):
            raise RuntimeError("lazy module exploded")

    monkeypatch.setitem(sys.modules, "odd_module_for_test", Odd("odd_module_for_test"))
    assert startfiles.record("odd") is True
    assert all("\n" not in f for f in startfiles.listed("odd"))
