"""engine.core.fsutil: the machine's boot and the sync of the filesystems a run writes to."""

from __future__ import annotations

import os

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
