"""Real `nvidia-smi --query-gpu` output, recorded on one H100 80GB HBM3 and two H200 (driver 580).

The files live in remote/recordings/ (package data), so the console's demo and benchmark can replay real GPU
telemetry on a machine without a GPU, and the parser tests read the same bytes. Keys are the file names.
"""

from __future__ import annotations

from pathlib import Path

RECORDINGS: dict[str, str] = {
    p.name: p.read_bytes().decode() for p in sorted(Path(__file__).with_name("recordings").glob("query_*.csv"))
}

QUERY_FIELDS = "index,name,uuid,memory.used,memory.total,utilization.gpu,temperature.gpu,power.draw"
