"""Pure text formatting for the console: bars, sparklines, sizes, durations, ages, times."""

from __future__ import annotations

import time
from typing import Iterable, Sequence

_SPARK = "▁▂▃▄▅▆▇█"
_EIGHTHS = " ▏▎▍▌▋▊▉█"


def bar(frac: float | None, width: int) -> str:
    """A horizontal bar `width` cells wide, in eighths; None or NaN gives an empty track."""
    if width <= 0:
        return ""
    if frac is None or frac != frac:
        return "·" * width
    frac = min(max(frac, 0.0), 1.0)
    eighths = round(frac * width * 8)
    full, part = divmod(eighths, 8)
    s = "█" * full + (_EIGHTHS[part] if part and full < width else "")
    return s + " " * (width - len(s))


def spark(values: Sequence[float], width: int, top: float | None = None) -> str:
    """The last `width` values as a sparkline scaled to `top` (default: their max), left-padded."""
    if width <= 0:
        return ""
    vals = list(values)[-width:]
    if not vals:
        return " " * width
    hi = top if top else max(vals)
    out = []
    for v in vals:
        if hi <= 0:
            out.append(_SPARK[0])
        else:
            i = int(round(min(max(v / hi, 0.0), 1.0) * (len(_SPARK) - 1)))
            out.append(_SPARK[i])
    return " " * (width - len(out)) + "".join(out)


def size(nbytes: float | None) -> str:
    if nbytes is None:
        return "-"
    n = float(nbytes)
    for unit in ("B", "K", "M", "G", "T", "P"):
        if abs(n) < 1024 or unit == "P":
            return f"{n:.0f}{unit}" if unit == "B" or n >= 100 else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}P"


def gib(mib: float) -> str:
    return f"{mib / 1024:.0f}" if mib >= 10 * 1024 else f"{mib / 1024:.1f}"


def duration(seconds: float | None) -> str:
    """`1h02m`, `3m05s`, `42s`; None gives `-`."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "-"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def age(then: float | None, now: float) -> str:
    if then is None:
        return "never"
    return duration(max(now - then, 0.0)) + " ago"


def rate(value: float | None, unit: str) -> str:
    if value is None or value != value:
        return "-"
    if unit in ("B", "bytes"):
        return size(value) + "/s"
    for per, mult in (("s", 1), ("min", 60), ("h", 3600)):
        v = value * mult
        if v >= 1 or per == "h":
            break
    num = f"{v / 1000:.1f}k" if v >= 10_000 else f"{v:.0f}" if v >= 100 else f"{v:.1f}"
    return f"{num}/{per}"


def clock_time(ts: float | None, with_date: bool = False) -> str:
    if not ts:
        return "-"
    fmt = "%Y-%m-%d %H:%M" if with_date else "%H:%M:%S"
    return time.strftime(fmt, time.gmtime(ts))


def count(done: float, total: float) -> str:
    if total:
        return f"{int(done)}/{int(total)}"
    return f"{int(done)}" if done else "-"


def ellipsize(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def plural(n: int, word: str, many: str | None = None) -> str:
    """"1 node", "2 nodes", "0 GPUs": the count and the noun in the number it takes."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def join_hosts(hosts: Iterable[str], ranks: int) -> str:
    hs = list(dict.fromkeys(h for h in hosts if h))
    s = hs[0] if len(hs) == 1 else plural(len(hs), "node") if hs else ""
    if ranks > 1:
        s = f"{s} ×{ranks}" if s else f"×{ranks}"
    return s or "-"


def rank_line(parts: Iterable[tuple[int, str, float, float]], world: int = 0, width: int = 0) -> str:
    """Each rank's share of a distributed stage: "ranks 2: r0 12/30 node0 · r1 10/28 node1" ("" for one rank, or
    none reported). Consecutive ranks at the same point on the same host read as one ("r8-15 17/61 node1");
    `width` > 0 cuts the line there with "…"."""
    parts = sorted(parts)
    world = max(world, len(parts))
    if world < 2 or not parts:
        return ""
    groups: list[list] = []  # [first rank, last rank, host, done, total]
    for r, host, done, total in parts:
        g = groups[-1] if groups else None
        if g is not None and g[1] == r - 1 and (g[2], g[3], g[4]) == (host, done, total):
            g[1] = r
        else:
            groups.append([r, r, host, done, total])
    text = f"ranks {world}: " + " · ".join(f"r{a}" + (f"-{b}" if b > a else "") + f" {count(done, total)}"
                                           + (f" {host}" if host else "") for a, b, host, done, total in groups)
    return ellipsize(text, width) if width > 0 else text
