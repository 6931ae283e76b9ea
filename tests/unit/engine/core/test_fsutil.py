"""engine.core.fsutil: the machine's boot and the sync of the filesystems a run writes to."""

from __future__ import annotations

import os

import pytest

from engine.core.fsutil import boot_id, sync_filesystems


def test_boot_id_is_the_kernels_unless_set(monkeypatch):
    monkeypatch.delenv("QUANTDECK_BOOT_ID", raising=False)
    with open("/proc/sys/kernel/random/boot_id") as fh:
        assert boot_id() == fh.read().strip() != ""
    monkeypatch.setenv("QUANTDECK_BOOT_ID", "after-a-reboot")
    assert boot_id() == "after-a-reboot"


def test_sync_filesystems_syncs_each_filesystem_once_and_walks_up_from_paths_not_made_yet(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"x" * 4096)
    calls = []
    monkeypatch.setattr(os, "sync", lambda: calls.append("sync"))  # only where syncfs fails or is missing
    assert sync_filesystems([tmp_path / "a" / "f", tmp_path / "not" / "yet", tmp_path]) == 1
    assert sync_filesystems([tmp_path, "/proc/self"]) == 2
    assert calls == []


def test_a_failing_syncfs_is_raised_not_hidden_behind_sync(tmp_path, monkeypatch):
    import ctypes
    import errno

    from engine.core import fsutil

    def failing(fd):
        ctypes.set_errno(errno.EIO)
        return -1

    monkeypatch.setattr(fsutil, "_libc_syncfs", lambda: failing)
    monkeypatch.setattr(os, "sync", lambda: None)
    with pytest.raises(OSError, match="syncfs: Input/output error") as e:
        sync_filesystems([tmp_path])
    assert e.value.errno == errno.EIO and e.value.filename == str(tmp_path)
