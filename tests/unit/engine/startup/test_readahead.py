"""engine.startup.readahead: a GPU run's source read into the page cache, in the pipeline's order, up to a budget."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from engine.startup import readahead


def _ckpt(tmp_path, sizes):
    names = [f"model-{i + 1:05d}-of-{len(sizes):05d}.safetensors" for i in range(len(sizes))]
    for n, size in zip(names, sizes, strict=True):
        (tmp_path / n).write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    wm = {f"t{i}": n for i, n in enumerate(reversed(names))}
    (tmp_path / readahead.INDEX).write_text(json.dumps({"weight_map": wm}))
    return [str(tmp_path / n) for n in names]


def test_reads_the_shards_in_order_up_to_the_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(readahead, "STEP", 1000)
    paths = _ckpt(tmp_path, [5000, 3333, 7000])
    assert readahead.source_shards(tmp_path) == paths  # the converter's order (sorted), not the index's
    seen: list[tuple[str, int]] = []
    t = readahead.ReadAhead(paths, budget=9000, threads=3)
    real = t._chunks
    t._chunks = lambda: ((p, o, n) for p, o, n in real() if not seen.append((p, o)))
    t.start()
    t.join(timeout=30)
    assert not t.is_alive() and t.bytes_read == 9000
    assert seen[0] == (paths[0], 0) and seen[-1] == (paths[2], 0) and len(seen) == 5 + 4 + 1
    everything = readahead.ReadAhead(paths, budget=10 ** 9, threads=2)
    everything.run()
    assert everything.bytes_read == 5000 + 3333 + 7000


def test_only_for_gpu_runs_once_per_directory_and_switchable(tmp_path, monkeypatch):
    monkeypatch.setattr(readahead, "interpreter_cold", lambda: False)  # whatever the page cache holds now
    _ckpt(tmp_path, [2048])
    assert readahead.start(tmp_path, "cpu") is None
    monkeypatch.setenv("QUANTDECK_NO_READAHEAD", "1")
    assert readahead.start(tmp_path / ".", "cuda") is None  # turned off (and now counted as started)
    monkeypatch.delenv("QUANTDECK_NO_READAHEAD")
    other = tmp_path / "b"
    other.mkdir()
    _ckpt(other, [4096, 100])
    t = readahead.start(other, "cuda:0")
    assert isinstance(t, threading.Thread)
    t.join(timeout=30)
    assert t.bytes_read == 4196
    assert readahead.start(other, "cuda") is None  # once per directory per process
    empty = tmp_path / "empty"
    empty.mkdir()
    assert readahead.start(empty, "cuda") is None


def test_page_cache_probe_and_no_read_ahead_beside_a_cold_import(tmp_path, monkeypatch):
    import os
    import time

    import torch  # noqa: F401 - imported: its files are in the page cache

    f = tmp_path / "blob"
    f.write_bytes(b"q" * (1 << 20))
    for _ in range(20):  # DONTNEED is advice: under load the kernel may keep the pages a moment longer
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        if readahead._page_cached(str(f)) is not True:
            break
        time.sleep(0.1)
    if readahead._page_cached(str(f)) is not None:  # None: the filesystem cannot tell (then nothing is skipped)
        assert readahead._page_cached(str(f)) is False
        f.read_bytes()
        assert readahead._page_cached(str(f), 4096 * 100) is True
    import importlib.util

    spec = importlib.util.find_spec("torch")  # what an import reads first (after a long test session, memory
    lib = Path(spec.origin).parent / "lib"  # pressure may have dropped those pages although torch is loaded)
    for p in [Path(importlib.util.cache_from_source(spec.origin)), Path(spec.origin)] + \
            [lib / n for n in readahead.IMPORT_LIBS]:
        if p.exists():
            with open(p, "rb") as fh:
                fh.read(4096)
    assert readahead.interpreter_cold() is False
    _ckpt(tmp_path, [4096])
    monkeypatch.setattr(readahead, "interpreter_cold", lambda: True)
    assert readahead.start(tmp_path, "cuda") is None  # the import needs the disk itself: no read-ahead


def test_budget_is_a_quarter_of_this_machines_available_memory_capped():
    from engine.core import meminfo

    avail = meminfo.available()
    assert avail > 0  # /proc/meminfo through the same parser remote.telemetry uses for the nodes
    # memory moves a little between the two reads of /proc/meminfo
    assert abs(readahead.default_budget() - min(readahead.CAP, avail // 4)) < (64 << 20)


def test_cpu_runs_read_ahead_only_on_many_cores_with_their_libraries_warm(tmp_path, monkeypatch):
    import numpy  # noqa: F401 - imported: numpy's core library is in the page cache

    _ckpt(tmp_path, [4096])
    assert readahead.start(tmp_path, "cpu", cpu_ok=False) is None  # a few cores: the kernels want them
    assert all(readahead._native_lib(*lib) for lib in readahead.CPU_IMPORTS)  # the probe finds its files
    monkeypatch.setattr(readahead, "cpu_imports_cold", lambda: True)
    assert readahead.start(tmp_path, "cpu", cpu_ok=True) is None  # numpy must load from disk first
    monkeypatch.setattr(readahead, "cpu_imports_cold", lambda: False)
    other = tmp_path / "b"
    other.mkdir()
    _ckpt(other, [4096, 100])
    t = readahead.start(other, "cpu", cpu_ok=True)
    assert isinstance(t, threading.Thread)
    t.join(timeout=30)
    assert t.bytes_read == 4196



def test_a_cold_cpu_start_reads_its_recorded_start_files_first_then_the_source(tmp_path, monkeypatch):
    from engine.startup import startfiles

    monkeypatch.setattr(readahead, "cpu_imports_cold", lambda: True)
    paths = _ckpt(tmp_path, [4096, 100])
    assert readahead.start(tmp_path, "cpu", cpu_ok=True, entry="test-entry") is None  # nothing recorded yet
    assert startfiles.record("test-entry")
    files = startfiles.listed("test-entry")
    seen: list[str] = []
    real = readahead.ReadAhead._chunks
    monkeypatch.setattr(readahead.ReadAhead, "_chunks", lambda self: ((p, o, n) for p, o, n in real(self)
                                                                     if not seen.append(p)))
    other = tmp_path / "b"
    other.mkdir()
    paths = _ckpt(other, [4096, 100])
    t = readahead.start(other, "cpu", cpu_ok=True, entry="test-entry")
    assert isinstance(t, threading.Thread)
    t.join(timeout=60)
    listed_bytes = sum(Path(f).stat().st_size for f in files)
    assert t.bytes_read == listed_bytes + 4196  # every start file whole (outside the budget), then the source
    first_src = seen.index(paths[0])
    nonempty = {f for f in files if Path(f).stat().st_size}
    assert set(seen[:first_src]) == nonempty and seen[first_src:] == paths  # the start files, then the source


def test_start_files_are_read_one_open_file_per_reader_and_capped(tmp_path, monkeypatch):
    """A list of a thousand files (a run that imported torch) once held a descriptor per file until the source
    was read too: past `ulimit -n` the converter's own opens failed."""
    import os

    from engine.startup import startfiles

    files = []
    for k in range(300):
        f = tmp_path / f"f{k}"
        f.write_bytes(b"m" * (100 + k))
        files.append(str(f))
    (tmp_path / "empty").write_bytes(b"")
    files.append(str(tmp_path / "empty"))
    files.append(str(tmp_path / "gone"))  # listed, since removed
    open_now, peak = [0], [0]
    real_open, real_close = os.open, os.close

    def counting_open(*a, **k):
        fd = real_open(*a, **k)
        open_now[0] += 1
        peak[0] = max(peak[0], open_now[0])
        return fd

    def counting_close(fd):
        open_now[0] -= 1
        real_close(fd)

    monkeypatch.setattr(os, "open", counting_open)
    monkeypatch.setattr(os, "close", counting_close)
    (tmp_path / "src").mkdir()
    paths = _ckpt(tmp_path / "src", [4096])
    t = readahead.ReadAhead(paths, budget=10 ** 9, threads=4, first=files)
    t.run()
    assert t.bytes_read == sum(100 + k for k in range(300)) + 4096
    assert peak[0] <= 4 + 1 and open_now[0] == 0  # at most one start file per reader, plus the source shard
    monkeypatch.setattr(startfiles, "MAX_BYTES", 1000)
    capped = readahead.ReadAhead([], budget=0, threads=2, first=files)
    capped.run()
    assert capped.bytes_read == 100 + 101 + 102 + 103 + 104 + 105 + 106 + 107 + 108  # whole files, up to the cap
