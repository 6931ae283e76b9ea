"""Real `nvidia-smi --query-gpu` output, recorded on lent machines (one H100 80GB HBM3, two H200; driver 580).

Verbatim copies of ../shared/recordings/nvidia-smi/query_*.csv, embedded so the console's demo and
benchmark can replay real GPU telemetry on a machine without a GPU. Keys are the recording file names.
"""

from __future__ import annotations

RECORDINGS: dict[str, str] = {
    'query_busy_1gpu.csv': '0, NVIDIA H100 80GB HBM3, GPU-32d9e788-4359-b740-2a2f-554b64f369b1, 7649, 81559, 100, 51, 695.46\n',
    'query_busy_2gpu.csv': '0, NVIDIA H200, GPU-b1f238da-768b-3939-37c3-de1334e40983, 7649, 143771, 100, 55, 612.79\n1, NVIDIA H200, GPU-bee5f25e-1bd4-09a1-6ac6-0f4e6c1379b7, 13879, 143771, 0, 37, 119.37\n',
    'query_idle_1gpu.csv': '0, NVIDIA H100 80GB HBM3, GPU-32d9e788-4359-b740-2a2f-554b64f369b1, 0, 81559, 0, 31, 70.83\n',
    'query_idle_1gpu_with_header.csv': 'index, name, uuid, memory.used [MiB], memory.total [MiB], utilization.gpu [%], temperature.gpu, power.draw [W]\n0, NVIDIA H100 80GB HBM3, GPU-32d9e788-4359-b740-2a2f-554b64f369b1, 0 MiB, 81559 MiB, 0 %, 31, 70.81 W\n',
    'query_idle_2gpu.csv': '0, NVIDIA H200, GPU-b1f238da-768b-3939-37c3-de1334e40983, 0, 143771, 0, 39, 121.61\n1, NVIDIA H200, GPU-bee5f25e-1bd4-09a1-6ac6-0f4e6c1379b7, 0, 143771, 0, 37, 123.83\n',
    'query_idle_2gpu_with_header.csv': 'index, name, uuid, memory.used [MiB], memory.total [MiB], utilization.gpu [%], temperature.gpu, power.draw [W]\n0, NVIDIA H200, GPU-b1f238da-768b-3939-37c3-de1334e40983, 0 MiB, 143771 MiB, 0 %, 39, 121.47 W\n1, NVIDIA H200, GPU-bee5f25e-1bd4-09a1-6ac6-0f4e6c1379b7, 0 MiB, 143771 MiB, 0 %, 37, 123.85 W\n',
}

QUERY_FIELDS = "index,name,uuid,memory.used,memory.total,utilization.gpu,temperature.gpu,power.draw"
