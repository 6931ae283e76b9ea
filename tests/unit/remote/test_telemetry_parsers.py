"""The telemetry parsers, on the REAL nvidia-smi output recorded on H100 / H200 machines."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.core.meminfo import parse_meminfo
from remote.recorded import RECORDINGS
from remote.telemetry import MIB, NodeState, parse_df_free, parse_nvidia_smi_csv, split_sections


def rec(name: str) -> str:
    return RECORDINGS[name]


def test_the_recordings_are_read_from_the_package():
    assert sorted(RECORDINGS) == [f"query_{k}.csv" for k in ("busy_1gpu", "busy_2gpu", "idle_1gpu",
                                                             "idle_1gpu_with_header", "idle_2gpu",
                                                             "idle_2gpu_with_header")]


def test_one_h100_idle():
    (g,) = parse_nvidia_smi_csv(rec("query_idle_1gpu.csv"))
    assert g.index == 0 and g.name == "NVIDIA H100 80GB HBM3"
    assert g.uuid == "GPU-32d9e788-4359-b740-2a2f-554b64f369b1"
    assert g.mem_used == 0 and g.mem_total == 81559 * MIB
    assert g.util == 0 and g.temp == 31 and g.power == pytest.approx(70.83)


def test_two_h200_busy():
    g0, g1 = parse_nvidia_smi_csv(rec("query_busy_2gpu.csv"))
    assert (g0.index, g1.index) == (0, 1)
    assert g0.name == g1.name == "NVIDIA H200"
    assert g0.mem_used == 7649 * MIB and g1.mem_used == 13879 * MIB
    assert g0.mem_total == g1.mem_total == 143771 * MIB
    assert (g0.util, g1.util) == (100, 0)
    assert (g0.temp, g1.temp) == (55, 37)
    assert g0.mem_fraction == pytest.approx(7649 / 143771)


@pytest.mark.parametrize("n", [1, 2])
def test_with_header_and_units_matches_noheader(n):
    with_header = parse_nvidia_smi_csv(rec(f"query_idle_{n}gpu_with_header.csv"))
    plain = parse_nvidia_smi_csv(rec(f"query_idle_{n}gpu.csv"))
    assert len(with_header) == len(plain) == n
    for a, b in zip(with_header, plain, strict=True):
        assert (a.index, a.name, a.uuid, a.mem_used, a.mem_total, a.util, a.temp) == \
               (b.index, b.name, b.uuid, b.mem_used, b.mem_total, b.util, b.temp)
        assert a.power == pytest.approx(b.power, abs=0.5)


def test_garbage_lines_are_skipped_not_fatal():
    text = ("WARNING: infoROM is corrupted at gpu 0000:4E:00.0\n\n"
            + rec("query_busy_2gpu.csv")
            + "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n"
            + "x, y, z, 1, 2, 3, 4, 5\n"
            + "1, NVIDIA H200, GPU-bee5f25e, 13879, 1437")  # a torn last line
    gpus = parse_nvidia_smi_csv(text)
    assert [g.index for g in gpus] == [0, 1]


def test_not_supported_fields_are_none():
    (g,) = parse_nvidia_smi_csv("0, Tesla T4, GPU-x, 10, 15360, [N/A], 40, [Not Supported]\n")
    assert g.util is None and g.power is None and g.temp == 40


def test_driver_failure_gives_no_gpus():
    msg = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
           "Make sure that the latest NVIDIA driver is installed and running.\n")
    assert parse_nvidia_smi_csv(msg) == []
    assert parse_nvidia_smi_csv("") == []


def test_meminfo_uses_available():
    text = "MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n"
    assert parse_meminfo(text) == ((24000000 - 20000000) * 1024, 24000000 * 1024)
    assert parse_meminfo("garbage") is None


def test_meminfo_of_this_machine():
    used, total = parse_meminfo(Path("/proc/meminfo").read_text())
    assert 0 < used < total


def test_df_posix():
    text = ("Filesystem     1024-blocks      Used Available Capacity Mounted on\n"
            "/dev/nvme0n1p1   959786032 412345678 498765432      46% /mnt/shared fs\n")
    assert parse_df_free(text) == 498765432 * 1024
    assert parse_df_free("df: /nope: No such file or directory\n") is None


def test_sections():
    out = split_sections("junk\n@@qd gpu\na\nb\n@@qd rc 127\n@@qd mem\nc\n")
    assert out == {"gpu": "a\nb", "rc 127": "", "mem": "c"}


def test_state_labels():
    assert NodeState.NO_GPU.label == "no GPU" and str(NodeState.STALE) == "stale"
