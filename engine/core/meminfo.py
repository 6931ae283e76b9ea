"""/proc/meminfo, parsed: this machine's (engine.startup.readahead's budget) or a node's read over SSH
(remote.telemetry)."""

from __future__ import annotations

KIB = 1 << 10


def parse_meminfo(text: str) -> tuple[int, int] | None:
    """(used, total) bytes from /proc/meminfo; used = MemTotal - MemAvailable (as `free` counts it)."""
    vals: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            vals[key.strip()] = int(parts[0]) * KIB
    total = vals.get("MemTotal")
    if not total:
        return None
    avail = vals.get("MemAvailable")
    if avail is None:
        avail = vals.get("MemFree", 0) + vals.get("Buffers", 0) + vals.get("Cached", 0)
    return total - avail, total


def available() -> int:
    """Bytes of memory available on this machine (0 where /proc/meminfo cannot be read)."""
    try:
        with open("/proc/meminfo") as fh:
            parsed = parse_meminfo(fh.read())
    except OSError:
        return 0
    return parsed[1] - parsed[0] if parsed else 0
